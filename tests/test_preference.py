"""Negatives, the reference table, and S-DPO end to end on the tiny model."""

import json
import math

import pytest
import torch

from sdpo.config import build_config
from sdpo.data.datasets import load_split
from sdpo.data.negatives import hard_negatives, random_negatives
from sdpo.data.prompts import encode_answer, record_prompt_ids
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.evaluation.protocols import evaluate
from sdpo.lm.models import load_model
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.training.preference import (
    LOG_FILE,
    REFERENCE_ADAPTER,
    AlignConfig,
    frozen_adapter_logps,
    inherit_from_sft,
    read_sft_run,
    reference_table,
    run_align,
)
from sdpo.training.reference import cached_reference_logps, compute_reference_logps, reference_journal
from sdpo.training.sft import SFTConfig, run_sft

RECORD = Record("r", None, ["h"], ["a", "b", "c", "d", "e", "f"], "c")


def test_hard_negatives_are_the_reference_top_k():
    reference = torch.tensor([-5.0, -1.0, 0.0, -3.0, -0.5, -9.0])  # the target (index 2) scores best
    assert hard_negatives(RECORD, 2, reference) == [4, 1]
    assert hard_negatives(RECORD, 5, reference) == [4, 1, 3, 0, 5]


def test_random_negatives_are_seeded_and_resampled_by_epoch():
    first = random_negatives(RECORD, 3, seed=0, position=4)
    assert first == random_negatives(RECORD, 3, seed=0, position=4)
    assert 2 not in first and len(set(first)) == 3
    draws = {tuple(random_negatives(RECORD, 3, seed=0, position=4, epoch=e)) for e in range(8)}
    assert len(draws) > 1


def test_a_killed_reference_pass_resumes_from_its_journal(tiny, small_data, tmp_path, monkeypatch):
    """The reference pass takes an hour on a study's records: a pass killed after its first batch computes only the rest."""
    import sdpo.evaluation.protocols as protocols

    model, tokenizer = tiny
    records = load_split(small_data, "val", limit=5)
    whole = compute_reference_logps(model, tokenizer, records, "music", batch_size=2)
    places = [tmp_path / "read-only" / "table.safetensors", tmp_path / "cache" / "table.safetensors"]
    (tmp_path / "read-only").write_text("a file where a folder would go")  # the first place cannot take a journal
    first = reference_journal(places, "key", {"batch_size": 2})
    compute_reference_logps(model, tokenizer, records[:2], "music", batch_size=2, journal=first)  # then killed
    assert (tmp_path / "cache" / "key.progress.jsonl.gz").is_file()
    batches = []
    scored = protocols.score_answers
    monkeypatch.setattr(protocols, "score_answers", lambda *a, **k: batches.append(1) or scored(*a, **k))
    resumed = compute_reference_logps(model, tokenizer, records, "music", batch_size=2, journal=reference_journal(places, "key", {"batch_size": 2}))
    assert len(batches) == 2 and torch.equal(resumed, whole)  # records 3-4 and 5; the first batch read back exactly
    assert len(reference_journal(places, "key", {"batch_size": 4})) == 0  # other settings: started over


def test_reference_table_reloads_equal_to_recomputed(tiny, small_data, tmp_path):
    model, tokenizer = tiny
    records = load_split(small_data, "val", limit=3)
    compute = lambda: compute_reference_logps(model, tokenizer, records, "music", batch_size=2)  # noqa: E731
    first = cached_reference_logps([tmp_path / "ref.safetensors"], "key-1", compute)
    assert first.shape == (3, 20) and torch.isfinite(first).all()
    reloaded = cached_reference_logps([tmp_path / "ref.safetensors"], "key-1", lambda: pytest.fail("recomputed"))
    assert torch.equal(reloaded, first)
    assert torch.allclose(compute(), reloaded, atol=1e-5)
    calls = []
    cached_reference_logps([tmp_path / "ref.safetensors"], "key-2", lambda: calls.append(1) or first)
    assert calls == [1]  # another fingerprint: recomputed


def refuse_writes_under(folder, monkeypatch):
    """Make the reference table's atomic writer raise PermissionError for any file under `folder`, as a read-only SFT folder does
    for a user that is not root (root writes through permissions, so a chmod alone checks nothing under CI)."""
    import sdpo.training.reference as reference

    def replace_atomic(path, write):
        if folder in path.parents:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, write)

    real = reference.replace_atomic
    monkeypatch.setattr(reference, "replace_atomic", replace_atomic)


@pytest.mark.parametrize("blocked", ["read-only folder", "parent is a file"])
def test_a_table_that_cannot_be_written_in_the_first_place_goes_to_the_next(tmp_path, monkeypatch, blocked):
    """The first place fails with an OSError (a refused write, or a file where a folder should be), whoever runs the test:
    the table is saved in the second place and read from there afterwards."""
    table = torch.arange(6.0).reshape(2, 3)
    first = tmp_path / "sft" / "reference-cache" / "t.safetensors"
    if blocked == "read-only folder":
        (tmp_path / "sft").mkdir()
        refuse_writes_under(tmp_path / "sft", monkeypatch)
    else:
        (tmp_path / "sft").write_text("a file, not a folder")
    places = [first, tmp_path / "align" / "reference-train.safetensors"]
    assert torch.equal(cached_reference_logps(places, "key", lambda: table), table)
    assert not first.exists() and places[1].is_file()
    assert torch.equal(cached_reference_logps(places, "key", lambda: pytest.fail("recomputed")), table)


def test_sft_then_sdpo_then_evaluate_on_tiny(small_data, tmp_path):
    sft_dir = run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / "sft"), "max_steps": 3,
        "learning_rate": 5e-3, "disable_tqdm": True, "train_limit": 12, "lora_dropout": 0.0,
    }))
    config_values = {
        "sft": str(sft_dir), "output_dir": str(tmp_path / "sdpo"), "negatives": 3, "beta": 1.0, "learning_rate": 5e-3,
        "max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 2,
        "save_steps": 2, "eval_limit": 4, "hr_limit": 4, "disable_tqdm": True, "train_limit": 16,
    }
    config = build_config(AlignConfig, config_values)
    out = run_align(config)
    logs = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    train_logs = [e for e in logs if "loss" in e]
    eval_logs = [e for e in logs if "eval_loss" in e]
    assert len(train_logs) == 4 and len(eval_logs) == 2
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert all(math.isfinite(e[key]) for e in train_logs), key
    assert all(0 <= e["eval_hr@1"] <= 1 and math.isfinite(e["eval_rewards/margins"]) for e in eval_logs)
    assert abs(train_logs[0]["rewards/chosen"]) < 1e-4  # step 1: the policy is still the reference (no dropout)
    assert (out / "adapter_model.safetensors").is_file()
    shared = list((sft_dir / "reference-cache").glob("*.safetensors"))
    assert len(shared) == 2  # train and val tables, kept with the SFT run for every align run from it
    again = build_config(AlignConfig, {**config_values, "output_dir": str(tmp_path / "dpo"), "loss": "dpo"})
    stamps = {p: p.stat().st_mtime_ns for p in shared}
    run_align(again)  # same SFT model, same records: the tables are reused, not recomputed
    assert {p: p.stat().st_mtime_ns for p in shared} == stamps and not (tmp_path / "dpo" / "reference-train.safetensors").exists()
    model, tokenizer = load_model("tiny", out)
    result = evaluate(model, tokenizer, load_split(small_data, "test", limit=3), "music", "rank", progress=False)
    assert 0 <= result.metrics["hr@1"] <= 1


def test_adapters_stored_in_bf16_are_what_later_stages_read(small_data, tmp_path):
    """adapter_dtype bf16 halves the stored weights (the fp32 run's, rounded), and align starts from those values."""
    from safetensors.torch import load_file

    stored = {}
    for dtype in ("fp32", "bf16"):
        run_sft(build_config(SFTConfig, {
            "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / f"sft-{dtype}"), "max_steps": 2,
            "learning_rate": 5e-3, "disable_tqdm": True, "train_limit": 8, "lora_dropout": 0.0, "adapter_dtype": dtype,
        }))
        stored[dtype] = load_file(tmp_path / f"sft-{dtype}" / "adapter_model.safetensors")
    assert stored["bf16"].keys() == stored["fp32"].keys()
    for name, weight in stored["bf16"].items():
        assert weight.dtype == torch.bfloat16 and torch.equal(weight, stored["fp32"][name].to(torch.bfloat16)), name
    out = run_align(build_config(AlignConfig, {
        "sft": str(tmp_path / "sft-bf16"), "output_dir": str(tmp_path / "sdpo"), "negatives": 3, "beta": 1.0, "max_steps": 1,
        "per_device_train_batch_size": 4, "logging_steps": 1, "disable_tqdm": True, "train_limit": 4, "adapter_dtype": "bf16",
    }))
    first = json.loads((out / LOG_FILE).read_text().splitlines()[0])
    assert abs(first["rewards/chosen"]) < 1e-4  # the policy starts as the stored bf16 SFT model, its reference
    assert all(w.dtype == torch.bfloat16 for w in load_file(out / "adapter_model.safetensors").values())
    with pytest.raises(UserError, match="--adapter_dtype 'fp16': choose bf16 or fp32"):
        build_config(SFTConfig, {"model": "tiny", "data": str(small_data), "adapter_dtype": "fp16"})


def test_reference_adapter_mode_matches_the_sft_model(small_data, tmp_path):
    """With a frozen copy of the SFT adapter as reference, step 1 has zero rewards and training moves on."""
    sft_dir = run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / "sft"), "max_steps": 2,
        "learning_rate": 5e-3, "disable_tqdm": True, "train_limit": 8, "lora_dropout": 0.0,
    }))
    out = run_align(build_config(AlignConfig, {
        "sft": str(sft_dir), "output_dir": str(tmp_path / "sdpo"), "negatives": 2, "reference": "adapter",
        "negative_sampling": "resample", "learning_rate": 5e-2, "max_steps": 3, "per_device_train_batch_size": 4,
        "logging_steps": 1, "disable_tqdm": True, "train_limit": 8,
    }))
    logs = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines() if '"loss"' in line]
    assert abs(logs[0]["rewards/chosen"]) < 1e-5 and abs(logs[0]["rewards/rejected"]) < 1e-5
    assert abs(logs[-1]["rewards/margins"]) > 1e-4  # the policy moved away from the frozen reference
    assert not (out / "reference").exists() and (out / "adapter_model.safetensors").is_file()


def test_align_refuses_bad_options(small_data, tmp_path):
    with pytest.raises(UserError, match="not an SFT run folder"):
        run_align(build_config(AlignConfig, {"sft": str(tmp_path), "output_dir": str(tmp_path / "x")}))
    with pytest.raises(UserError, match="--loss must be one of sdpo, dpo"):
        build_config(AlignConfig, {"loss": "ipo"})
    with pytest.raises(UserError, match="hard picks negatives by reference scores"):
        build_config(AlignConfig, {"reference": "adapter", "negative_sampling": "hard"})


def sft_run(small_data, out, **overrides):
    return run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(out), "max_steps": 2, "learning_rate": 5e-2,
        "disable_tqdm": True, "train_limit": 8, **overrides,
    }))


def preference_batch(tokenizer, records, k=3):
    prompts = [record_prompt_ids(tokenizer, r, "music") for r in records]
    answers = [[encode_answer(tokenizer, c) for c in [r.target, *r.negatives[:k]]] for r in records]
    return pack_answers(prompts, answers, tokenizer.pad_token_id)


def test_frozen_reference_adapter_is_deterministic_in_train_mode(small_data, tmp_path):
    """The adapter reference runs without LoRA dropout even while the policy trains (dropout 0.1)."""
    sft_dir = sft_run(small_data, tmp_path / "sft", lora_dropout=0.1)
    model, tokenizer = load_model("tiny", sft_dir, trainable_adapter=True)
    model.load_adapter(str(sft_dir), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter("default")
    model.train()
    packed = preference_batch(tokenizer, load_split(small_data, "train", limit=4))
    first, second = frozen_adapter_logps(model, packed), frozen_adapter_logps(model, packed)
    assert torch.equal(first, second)
    assert model.training and model.active_adapter == "default"
    with torch.no_grad():
        dropped, _ = answer_logprobs(model, packed)  # the policy itself does drop out in train mode
    assert not torch.allclose(dropped, first, atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_rewards_are_zero_at_step_zero(small_data, tmp_path, bf16):
    """The reference table is computed at the policy's precision: before any update every reward is 0 (bf16: to bf16 noise)."""
    sft_dir = sft_run(small_data, tmp_path / "sft", lora_dropout=0.0)
    config = build_config(AlignConfig, {"sft": str(sft_dir), "output_dir": str(tmp_path / "align"), "train_limit": 8, "bf16": bf16})
    model, tokenizer = load_model("tiny", sft_dir, trainable_adapter=True, dtype=torch.bfloat16 if bf16 else torch.float32)
    inherit_from_sft(config, read_sft_run(str(sft_dir)))
    records = load_split(small_data, "train", 8, config.subset_seed)
    table = reference_table(model, tokenizer, records, config, "train")  # batches of 4 records x 20 candidates
    model.train()
    chosen = [[r.candidates.index(c) for c in [r.target, *r.negatives[:3]]] for r in records]
    with torch.no_grad():
        logps, _ = answer_logprobs(model, preference_batch(tokenizer, records))  # one batch, 1+K answers each
    rewards = logps - torch.stack([table[i, idx] for i, idx in enumerate(chosen)])
    # bf16: a table computed in fp32 against this bf16 policy (the old mismatch) is off by 0.039 here
    assert rewards.abs().max() < (0.01 if bf16 else 1e-4), rewards.abs().max()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.bfloat16 if bf16 else torch.float32}


def test_rewards_are_zero_at_the_first_step_with_collaborative_tokens(small_data, sasrec_dir, tmp_path):
    """With collaborative prompts, the precomputed table scores them through the SFT run's own trained projectors, as the
    policy does: the first logged step (the policy still the SFT model, no LoRA dropout and no hidden titles) has zero rewards
    and margins."""
    sft_dir = sft_run(small_data, tmp_path / "sft", lora_dropout=0.0, collaborative=str(sasrec_dir), collaborative_score=True,
                      projector_learning_rate=1e-2, bf16=False)
    out = run_align(build_config(AlignConfig, {
        "sft": str(sft_dir), "output_dir": str(tmp_path / "sdpo"), "negatives": 3, "max_steps": 1, "per_device_train_batch_size": 4,
        "logging_steps": 1, "disable_tqdm": True, "train_limit": 4, "bf16": False, "collaborative_unknown_rate": 0.0,
    }))
    first = next(e for e in map(json.loads, (out / LOG_FILE).read_text().splitlines()) if "loss" in e)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-4, (key, first[key])
    assert len(list((sft_dir / "reference-cache").glob("*.safetensors"))) == 1  # the reference was the precomputed table
