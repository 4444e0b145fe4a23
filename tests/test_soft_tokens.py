"""Soft tokens: the projector's scale and unknown vector, and prompts whose embeddings are swapped at given positions."""

import pytest
import torch

from sdpo.lm.scoring import answer_logprobs, pack_answers, score_answers
from sdpo.lm.soft_tokens import Projector, embed_with_soft_tokens, token_embedding_norm


def test_the_projector_outputs_the_token_embeddings_norm_and_a_learned_unknown_vector():
    torch.manual_seed(0)
    projector = Projector(in_dim=8, hidden_size=16, norm=3.5, width=12)
    vectors = torch.randn(2, 5, 8) * torch.tensor([1e-3, 1.0, 1e3, 1.0, 1.0])[None, :, None]  # any scale in
    known = torch.tensor([[True, True, True, False, True], [True, False, True, True, True]])
    out = projector(vectors, known)
    assert out.shape == (2, 5, 16)
    assert torch.allclose(out.norm(dim=-1), torch.full((2, 5), 3.5), atol=1e-4)
    assert torch.equal(out[0, 3], out[1, 1])  # both unknown: the one learned vector, whatever the input held
    assert not torch.equal(out[0, 0], out[0, 1])
    # the unknown vector and the MLP learn; what is known never passes through the unknown vector
    out[known].sum().backward()
    assert projector.unknown.grad is not None and projector.unknown.grad.abs().sum() == 0
    assert projector.net[0].weight.grad.abs().sum() > 0
    projector.zero_grad()
    projector(vectors, known)[~known].sum().backward()
    assert projector.unknown.grad.abs().sum() > 0


def test_token_embedding_norm_is_the_mean_row_norm(tiny):
    model, _ = tiny
    weight = model.get_input_embeddings().weight
    assert abs(token_embedding_norm(model) - weight.norm(dim=-1).mean().item()) < 1e-5


def test_soft_tokens_replace_exactly_the_given_positions(tiny):
    model, tokenizer = tiny
    input_ids = torch.tensor(tokenizer(["a user listened to Radiohead and Muse", "then to Björk"], padding=True)["input_ids"])
    plain = model.get_input_embeddings()(input_ids)
    hidden = plain.shape[-1]
    nothing = torch.full((2, 3), -1)
    assert torch.equal(embed_with_soft_tokens(model, input_ids, nothing, torch.zeros(2, 3, hidden)), plain)
    positions = torch.tensor([[1, 4, -1], [2, -1, -1]])
    soft = torch.randn(2, 3, hidden, requires_grad=True)
    mixed = embed_with_soft_tokens(model, input_ids, positions, soft)
    swapped = {(0, 1): soft[0, 0], (0, 4): soft[0, 1], (1, 2): soft[1, 0]}
    for b in range(2):
        for p in range(input_ids.shape[1]):
            expected = swapped.get((b, p), plain[b, p])
            assert torch.equal(mixed[b, p], expected), (b, p)
    mixed.sum().backward()
    assert soft.grad[0, 2].abs().sum() == 0 and soft.grad[0, 0].abs().sum() > 0  # an unused slot takes no gradient
    # soft tokens that are the placeholders' own embeddings give the plain model's output, to the bit
    own = plain.detach()[torch.arange(2)[:, None], positions.clamp_min(0)]
    with torch.no_grad():
        logits = model(inputs_embeds=embed_with_soft_tokens(model, input_ids, positions, own)).logits
        assert torch.equal(logits, model(input_ids=input_ids).logits)
        # and other vectors change the prediction from their position on, never before it (a causal LM)
        changed = model(inputs_embeds=embed_with_soft_tokens(model, input_ids, positions, soft.detach() * 10)).logits
        reference = model(input_ids=input_ids).logits
    assert torch.equal(changed[0, :1], reference[0, :1]) and not torch.allclose(changed[0, 1:], reference[0, 1:])
    assert torch.equal(changed[1, :2], reference[1, :2])


def plain_soft_logprob(model, prompt, answer, positions, vectors) -> float:
    """Slow and obvious: prompt + answer as its own sequence, soft tokens swapped in, the answer's log-probs summed."""
    embeds = embed_with_soft_tokens(model, torch.tensor([prompt + answer]), positions[None], vectors[None])
    logps = torch.log_softmax(model(inputs_embeds=embeds).logits[0].float(), dim=-1)
    return sum(logps[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer))


def soft_slots(prompts, hidden, seed=0):
    """Up to three soft tokens per prompt at random prompt positions (-1 pads the unused slots), and their vectors."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in prompts:
        chosen = torch.randperm(len(prompt), generator=generator)[:3].tolist()
        rows.append(chosen + [-1] * (3 - len(chosen)))
    return torch.tensor(rows), torch.randn(len(prompts), 3, hidden, generator=generator)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
def test_the_packed_kernel_with_soft_tokens_equals_one_sequence_per_answer(attn, lora):
    from tests.test_scoring import make_model, random_batch

    model, tokenizer = make_model(attn, lora)
    prompts, answers = random_batch(7, 4, 3)
    positions, vectors = soft_slots(prompts, model.config.hidden_size)
    with torch.no_grad():
        packed = score_answers(model, prompts, answers, tokenizer.pad_token_id, soft=(positions, vectors))
        without = score_answers(model, prompts, answers, tokenizer.pad_token_id)
        for b, (prompt, record_answers) in enumerate(zip(prompts, answers, strict=True)):
            for a, answer in enumerate(record_answers):
                assert abs(packed[b, a].item() - plain_soft_logprob(model, prompt, answer, positions[b], vectors[b])) <= 1e-4
    finite = torch.isfinite(without)
    assert (packed[finite] - without[finite]).abs().max() > 1e-2  # the soft tokens count


def test_gradients_reach_the_soft_vectors_through_the_kernel():
    from tests.test_scoring import make_model, random_batch

    model, tokenizer = make_model("sdpa", True)
    prompts, answers = random_batch(3, 2, 2)
    positions, vectors = soft_slots(prompts, model.config.hidden_size, seed=1)
    positions[1, 1:] = -1  # a record with one soft token
    vectors.requires_grad_(True)
    packed = pack_answers(prompts, answers, tokenizer.pad_token_id)
    logps, _ = answer_logprobs(model, packed, soft=(positions, vectors))
    logps.sum().backward()
    used = positions >= 0
    assert (vectors.grad[used].abs().sum(dim=-1) > 0).all() and vectors.grad[~used].abs().sum() == 0


def test_the_trunk_cache_keys_prompts_with_soft_tokens_on_their_vectors(tmp_path):
    """Soft tokens enter layer 0, so the cached trunk holds them: the same vectors reuse a file, bitwise; others get their own."""
    from sdpo.lm.trunk import TrunkCache
    from tests.test_trunk import adapted_model, count_calls

    model, tokenizer = adapted_model(last_layers=1)
    prompts, answers = random_batch_for_trunk()
    positions, vectors = soft_slots(prompts, model.config.hidden_size, seed=2)
    other = vectors + 1.0
    with torch.no_grad():
        expected = {name: score_answers(model, prompts, answers, tokenizer.pad_token_id, soft=(positions, v))
                    for name, v in (("these", vectors), ("other", other))}
        trunk = TrunkCache(tmp_path, model, depth=1)
        filled = score_answers(model, prompts, answers, tokenizer.pad_token_id, trunk=trunk, soft=(positions, vectors))
        assert len(list(tmp_path.rglob("*.safetensors"))) == 1
        layer0 = count_calls(model.get_base_model().model.layers[0])
        again = score_answers(model, prompts, answers, tokenizer.pad_token_id, trunk=trunk, soft=(positions, vectors))
        assert layer0 == [1] and trunk.usable  # loaded, checked once against the full forward, and it agreed
        again_unchecked = score_answers(model, prompts, answers, tokenizer.pad_token_id, trunk=trunk, soft=(positions, vectors))
        assert layer0 == [1]  # from the cache alone
        moved = score_answers(model, prompts, answers, tokenizer.pad_token_id, trunk=trunk, soft=(positions, other))
        assert len(list(tmp_path.rglob("*.safetensors"))) == 2  # other vectors: another file, not the first one's states
        plain = score_answers(model, prompts, answers, tokenizer.pad_token_id, trunk=trunk)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    for got in (filled, again, again_unchecked):
        assert torch.equal(got, expected["these"])
    assert torch.equal(moved, expected["other"]) and not torch.equal(moved, filled)
    assert not torch.equal(plain, filled)


def random_batch_for_trunk():
    from tests.test_scoring import random_batch

    return random_batch(11, 3, 3)
