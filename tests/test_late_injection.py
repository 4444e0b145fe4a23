"""Late injection: soft tokens enter the first layer with LoRA, so the layers below read text and are shared by every stage."""

import json

import pytest
import torch

from sdpo.config import build_config
from sdpo.lm.decoder import causal_lm_parts
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.scoring import score_answers
from sdpo.lm.soft_tokens import SoftTokenSpec, inject, injected_at
from sdpo.pipeline import evaluate_model
from sdpo.training.runs import read_run_config
from sdpo.training.sft import SFTConfig, run_sft
from tests.test_soft_tokens import soft_slots


def test_inject_replaces_the_positions_with_the_vectors_at_the_norm_of_what_they_replace():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 5.0], [2.0, 2.0]]])
    got = inject(hidden, torch.tensor([[1, -1]]), torch.tensor([[[3.0, 4.0], [9.0, 9.0]]]))
    assert got[0, 1].tolist() == pytest.approx([3.0, 4.0])  # |(0, 5)| = 5 = |(3, 4)|
    assert torch.equal(got[0, 0], hidden[0, 0]) and torch.equal(got[0, 2], hidden[0, 2])
    got = inject(hidden, torch.tensor([[2]]), torch.tensor([[[0.0, 1.0]]]))
    assert got[0, 2].tolist() == pytest.approx([0.0, 8 ** 0.5])


def late_model(layer=1):
    model, tokenizer = load_model("tiny", soft_tokens=SoftTokenSpec(8, layer=layer))
    model = add_lora(model, LoraSettings(dropout=0.0, last_layers=1))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval(), tokenizer


def plain_late_logprob(model, prompt, answer, positions, vectors, layer=1) -> float:
    """Slow and obvious: prompt + answer as its own sequence, text up to `layer`, the soft tokens put into the states entering it."""
    decoder, _ = causal_lm_parts(model)
    with injected_at(decoder.layers[layer], positions[None], vectors[None]):
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(logps[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer))


def test_the_packed_kernel_with_late_soft_tokens_equals_one_sequence_per_answer():
    from tests.test_scoring import random_batch

    model, tokenizer = late_model()
    prompts, answers = random_batch(3, 4, 3)
    positions, vectors = soft_slots(prompts, model.config.hidden_size)
    with torch.no_grad():
        packed = score_answers(model, prompts, answers, tokenizer.pad_token_id, soft=(positions, vectors))
        without = score_answers(model, prompts, answers, tokenizer.pad_token_id)
        for b, (prompt, record_answers) in enumerate(zip(prompts, answers, strict=True)):
            for a, answer in enumerate(record_answers):
                assert abs(packed[b, a].item() - plain_late_logprob(model, prompt, answer, positions[b], vectors[b])) <= 1e-4
    finite = torch.isfinite(without)
    assert (packed[finite] - without[finite]).abs().max() > 1e-2  # the soft tokens count


def test_the_layers_below_read_text_whatever_the_soft_tokens():
    """The states entering the injection layer are the text prompt's: two sets of soft tokens leave them unchanged."""
    from sdpo.lm.decoder import states_entering
    from tests.test_scoring import random_batch

    model, tokenizer = late_model()
    decoder, _ = causal_lm_parts(model)
    prompts, answers = random_batch(4, 2, 2)
    positions, vectors = soft_slots(prompts, model.config.hidden_size)
    seen = []
    with torch.no_grad():
        for soft in (None, (positions, vectors), (positions, -vectors)):
            with states_entering(decoder.layers[1]) as kept:
                score_answers(model, prompts, answers, tokenizer.pad_token_id, soft=soft)
            seen.append(kept[-1])
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])


@pytest.fixture(scope="module")
def late_sft(small_data, sasrec_dir, tmp_path_factory):
    return run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path_factory.mktemp("late") / "sft"), "max_steps": 2,
        "learning_rate": 5e-2, "projector_learning_rate": 1e-2, "disable_tqdm": True, "train_limit": 8, "bf16": False,
        "lora_dropout": 0.0, "lora_layers": 1, "collaborative": str(sasrec_dir), "collaborative_score": True,
        "collaborative_inject": "lora",
    }))


def test_a_late_run_records_its_layer_and_shares_its_trunk_with_trained_projectors(late_sft, tmp_path):
    from tests.test_trunk_states import align_run, assert_same_training

    assert read_run_config(late_sft)["collaborative_layer"] == 1
    plain = align_run(late_sft, tmp_path / "plain")
    shared = align_run(late_sft, tmp_path / "shared", share_trunk=True)  # the projectors train: allowed, their tokens enter above
    assert_same_training(plain, shared)
    assert read_run_config(shared)["collaborative_layer"] == 1


@pytest.mark.parametrize("protocol", ["rank", "generate"])
def test_a_late_run_evaluates_the_same_with_the_trunk_cache(late_sft, small_data, tmp_path, protocol, capsys):
    full = evaluate_model(small_data, "test", None, late_sft, protocol, 4, tmp_path / "full", 2, progress=False, bf16=False)
    for name in ("filled", "cached"):  # the first fills the cache, the second reads it (and checks it against the full pass)
        cached = evaluate_model(small_data, "test", None, late_sft, protocol, 4, tmp_path / name, 2, progress=False, bf16=False,
                                trunk_cache=tmp_path / "trunk", trunk_depth=1)
    assert any((tmp_path / "trunk").rglob("*.safetensors"))
    assert "differs from the full computation" not in capsys.readouterr().out  # the cache was exact, so it served
    assert full["hr@1"] == cached["hr@1"]
    rows = [[json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()] for name in ("full", "cached")]
    key = "ranking" if protocol == "rank" else "generated"
    assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]]


def test_late_injection_needs_lora_on_the_last_layers(small_data, sasrec_dir, tmp_path):
    from sdpo.errors import UserError

    with pytest.raises(UserError, match="--lora_layers N"):
        build_config(SFTConfig, {"model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / "s"),
                                 "collaborative": str(sasrec_dir), "collaborative_inject": "lora"})
