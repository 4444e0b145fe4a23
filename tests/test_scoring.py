"""The packed scoring kernel against the plain one-sequence-per-answer computation."""

import random

import pytest
import torch

from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.scoring import answer_logprobs, block_attention_mask, pack_answers, score_answers


def plain_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """Slow and obvious: run prompt + answer as its own sequence and sum the answer's log-probs."""
    logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(logps[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer))


def random_batch(seed: int, n_records: int, max_answers: int, vocab: int = 49152):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(n_records)]
    answers = [
        [[rng.randrange(vocab) for _ in range(rng.randint(1, 8))] for _ in range(rng.randint(1, max_answers))]
        for _ in range(n_records)
    ]
    return prompts, answers


def make_model(attn: str, lora: bool):
    model, tokenizer = load_model("tiny", attn_implementation=attn)
    if lora:
        model = add_lora(model, LoraSettings(dropout=0.0))
        with torch.no_grad():  # LoRA B starts at zero; make the adapter change the outputs
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    return model.eval(), tokenizer


def set_attention(model, attn: str) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(attn)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("lora", [False, True])
def test_packed_equals_plain(attn, lora):
    model, tokenizer = make_model(attn, lora)
    cases = [random_batch(1, 4, 20), random_batch(2, 3, 3), ([[5]], [[[7]]]), random_batch(3, 2, 1)]
    with torch.no_grad():
        for prompts, answers in cases:
            packed = score_answers(model, prompts, answers, tokenizer.pad_token_id)
            assert packed.shape == (len(prompts), max(len(a) for a in answers))
            if attn == "flex_attention":  # the reference runs one unmasked sequence: plain SDPA on the same weights
                set_attention(model, "sdpa")
            for b, (prompt, record_answers) in enumerate(zip(prompts, answers, strict=True)):
                for a, answer in enumerate(record_answers):
                    assert abs(packed[b, a].item() - plain_logprob(model, prompt, answer)) <= 1e-4
                assert torch.isneginf(packed[b, len(record_answers):]).all()
            set_attention(model, attn)


def test_lora_changes_scores_so_the_lora_case_means_something():
    prompts, answers = random_batch(4, 2, 5)
    with torch.no_grad():
        plain = score_answers(make_model("sdpa", False)[0], prompts, answers, 2)
        adapted = score_answers(make_model("sdpa", True)[0], prompts, answers, 2)
    finite = torch.isfinite(plain)
    assert (plain[finite] - adapted[finite]).abs().max() > 1e-2


def test_packing_layout():
    packed = pack_answers([[10, 11, 12], [20]], [[[1, 2], [3]], [[4, 5, 6]]], pad_token_id=0)
    assert packed["input_ids"].tolist() == [[10, 11, 12, 1, 2, 3], [20, 4, 5, 6, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]
    assert packed["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, -1, -1]]
    # first answer tokens are predicted by the last prompt position
    assert packed["token_source"].tolist() == [2, 3, 2, 0, 1, 2]
    assert packed["token_answer"].tolist() == [0, 0, 1, 2, 2, 2]
    assert packed["answer_mask"].tolist() == [[True, True], [True, False]]
    mask = block_attention_mask(packed["segment_ids"], torch.float32)[0, 0] == 0
    assert mask[5].tolist() == [True, True, True, False, False, True]  # answer 2 sees prompt + itself
    assert mask[4].tolist() == [True, True, True, True, True, False]


def test_gradients_flow_through_the_kernel():
    model, tokenizer = make_model("sdpa", True)
    prompts, answers = random_batch(5, 2, 3)
    packed = pack_answers(prompts, answers, tokenizer.pad_token_id)
    logps, counts = answer_logprobs(model, packed)
    assert counts.sum().item() == sum(len(a) for rs in answers for a in rs)
    (-logps.sum()).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bad_packing_input():
    with pytest.raises(ValueError, match="empty prompt"):
        pack_answers([[]], [[[1]]], 0)
    with pytest.raises(ValueError, match="no tokens"):
        pack_answers([[1]], [[[]]], 0)
