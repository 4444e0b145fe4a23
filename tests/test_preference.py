"""Negatives, the reference table, and S-DPO end to end on the tiny model."""

import json
import math

import pytest
import torch

from sdpo.config import build_config
from sdpo.datasets import load_split
from sdpo.errors import UserError
from sdpo.evaluation import evaluate
from sdpo.models import load_model
from sdpo.negatives import hard_negatives, random_negatives
from sdpo.records import Record
from sdpo.training.preference import LOG_FILE, AlignConfig, run_align
from sdpo.training.reference import cached_reference_logps, compute_reference_logps
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


def test_reference_table_reloads_equal_to_recomputed(tiny, small_data, tmp_path):
    model, tokenizer = tiny
    records = load_split(small_data, "val", limit=3)
    compute = lambda: compute_reference_logps(model, tokenizer, records, "music", batch_size=2)  # noqa: E731
    first = cached_reference_logps(tmp_path / "ref.safetensors", "key-1", compute)
    assert first.shape == (3, 20) and torch.isfinite(first).all()
    reloaded = cached_reference_logps(tmp_path / "ref.safetensors", "key-1", lambda: pytest.fail("recomputed"))
    assert torch.equal(reloaded, first)
    assert torch.allclose(compute(), reloaded, atol=1e-5)
    calls = []
    cached_reference_logps(tmp_path / "ref.safetensors", "key-2", lambda: calls.append(1) or first)
    assert calls == [1]  # another fingerprint: recomputed


def test_sft_then_sdpo_then_evaluate_on_tiny(small_data, tmp_path):
    sft_dir = run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / "sft"), "max_steps": 3,
        "learning_rate": 5e-3, "disable_tqdm": True, "train_limit": 12, "lora_dropout": 0.0,
    }))
    config = build_config(AlignConfig, {
        "sft": str(sft_dir), "output_dir": str(tmp_path / "sdpo"), "negatives": 3, "beta": 1.0, "learning_rate": 5e-3,
        "max_steps": 4, "per_device_train_batch_size": 4, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 2,
        "save_steps": 2, "eval_limit": 4, "hr_limit": 4, "disable_tqdm": True, "train_limit": 16,
    })
    out = run_align(config)
    logs = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    train_logs = [e for e in logs if "loss" in e]
    eval_logs = [e for e in logs if "eval_loss" in e]
    assert len(train_logs) == 4 and len(eval_logs) == 2
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert all(math.isfinite(e[key]) for e in train_logs), key
    assert all(0 <= e["eval_hr@1"] <= 1 and math.isfinite(e["eval_rewards/margins"]) for e in eval_logs)
    assert abs(train_logs[0]["rewards/chosen"]) < 1e-4  # step 1: the policy is still the reference (no dropout)
    assert (out / "reference-train.safetensors").is_file() and (out / "adapter_model.safetensors").is_file()
    model, tokenizer = load_model("tiny", out)
    result = evaluate(model, tokenizer, load_split(small_data, "test", limit=3), "music", "rank", progress=False)
    assert 0 <= result.metrics["hr@1"] <= 1


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
