import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdpo.config import build_config
from sdpo.data.datasets import load_split
from sdpo.data.prompts import encode_answer, record_prompt_ids
from sdpo.errors import UserError
from sdpo.lm.models import load_model
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.training.sft import CONFIG_FILE, SFTConfig, run_sft


def mean_nll(model, tokenizer, records) -> float:
    prompts = [record_prompt_ids(tokenizer, r, "music") for r in records]
    answers = [[encode_answer(tokenizer, r.target)] for r in records]
    with torch.no_grad():
        logps, counts = answer_logprobs(model.eval(), pack_answers(prompts, answers, tokenizer.pad_token_id))
    return (-logps.sum() / counts.sum()).item()


def sft_config(small_data, out, **overrides):
    values = {
        "model": "tiny", "data": str(small_data), "output_dir": str(out), "learning_rate": 5e-3,
        "num_train_epochs": 3, "per_device_train_batch_size": 4, "lora_dropout": 0.0, "logging_steps": 2,
        "save_steps": 2, "disable_tqdm": True, **overrides,
    }
    return build_config(SFTConfig, values)


def test_sft_lowers_the_loss_and_saves_a_loadable_adapter(small_data, tmp_path):
    out = run_sft(sft_config(small_data, tmp_path / "sft"))
    records = load_split(small_data, "train")
    base, tokenizer = load_model("tiny")
    trained, _ = load_model("tiny", adapter=out)
    before, after = mean_nll(base, tokenizer, records), mean_nll(trained, tokenizer, records)
    assert after < before - 0.5, (before, after)
    saved = (out / CONFIG_FILE).read_text()
    assert "learning_rate: 0.005" in saved and "model: tiny" in saved
    assert (out / "tokenizer.json").is_file() and (out / "adapter_model.safetensors").is_file()
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]


def interrupt_after(out, step: int) -> None:
    """Make a finished run look like one killed after checkpoint `step`: later checkpoints and final files gone."""
    for path in out.iterdir():
        if path.name.startswith("checkpoint-") and int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
        elif path.is_file() and path.name != CONFIG_FILE and path.name != "log.jsonl":
            path.unlink()


def test_sft_resumes_from_its_checkpoint(small_data, tmp_path):
    out, whole = tmp_path / "sft", tmp_path / "whole"
    run_sft(sft_config(small_data, whole, max_steps=6, save_total_limit=None))
    run_sft(sft_config(small_data, out, max_steps=6, save_total_limit=None))
    interrupt_after(out, 4)
    with pytest.raises(UserError, match="not empty .*--resume"):
        run_sft(sft_config(small_data, out, max_steps=6, save_total_limit=None))
    with pytest.raises(UserError, match="other options .*learning_rate"):
        run_sft(sft_config(small_data, out, max_steps=6, save_total_limit=None, learning_rate=1e-3, resume=True))
    run_sft(sft_config(small_data, out, max_steps=6, save_total_limit=None, resume=True))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == [2, 4, 6]  # steps 1-4 came from the checkpoint, not retrained
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert logged == [2, 4, 6]  # the log holds each step once
    resumed, uninterrupted = (load_file(str(d / "adapter_model.safetensors")) for d in (out, whole))
    assert all(torch.allclose(resumed[k], uninterrupted[k], atol=1e-6) for k in uninterrupted)


def test_resume_refuses_another_version_and_a_damaged_checkpoint(small_data, tmp_path):
    out = tmp_path / "sft"
    run_sft(sft_config(small_data, out, max_steps=4, save_total_limit=None))
    interrupt_after(out, 2)
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="checkpoint-2: incomplete checkpoint, optimizer.pt is missing"):
        run_sft(sft_config(small_data, out, max_steps=4, resume=True))
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"")
    (out / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="adapter_model.safetensors: damaged"):
        run_sft(sft_config(small_data, out, max_steps=4, resume=True))
    config = yaml.safe_load((out / CONFIG_FILE).read_text())
    config["sdpo_version"] = "0.1.0"
    (out / CONFIG_FILE).write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="written by sdpo 0.1.0"):
        run_sft(sft_config(small_data, out, max_steps=4, resume=True))


def test_resume_without_checkpoint_and_missing_data(small_data, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        run_sft(sft_config(small_data, tmp_path / "none", resume=True))
    with pytest.raises(UserError, match="no dataset given"):
        run_sft(sft_config("", tmp_path / "x"))


def test_config_rejects_unknown_options(small_data, tmp_path):
    with pytest.raises(UserError, match="unknown option"):
        build_config(SFTConfig, {"learning_rat": 1})
    with pytest.raises(UserError, match="unknown command-line option"):
        build_config(SFTConfig, {}, ["--no_such_flag", "1"])
    config = build_config(SFTConfig, {"learning_rate": 1e-3}, ["--learning-rate", "3e-4", "--lora_r", "4"])
    assert config.learning_rate == 3e-4 and config.lora_r == 4 and config.lora_alpha == 32


def test_resume_skips_a_half_written_checkpoint(small_data, tmp_path, capsys):
    """A crash while checkpoint-4 was being written: resume from checkpoint-2 and end where an uninterrupted run ends."""
    out, whole = tmp_path / "sft", tmp_path / "whole"
    run_sft(sft_config(small_data, whole, max_steps=6, save_total_limit=None))
    run_sft(sft_config(small_data, out, max_steps=6, save_total_limit=None))
    interrupt_after(out, 4)
    (out / "checkpoint-4" / "scheduler.pt").unlink()
    run_sft(sft_config(small_data, out, max_steps=6, save_total_limit=None, resume=True))
    assert "skipping checkpoint-4" in capsys.readouterr().out
    resumed, uninterrupted = (load_file(str(d / "adapter_model.safetensors")) for d in (out, whole))
    assert all(torch.allclose(resumed[k], uninterrupted[k], atol=1e-6) for k in uninterrupted)
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert logged == [2, 4, 6]


def test_gradient_checkpointing_trains_the_same_adapter(small_data, tmp_path):
    """--activation_checkpointing (gradient checkpointing) recomputes activations in backward; the gradients, so the adapter, are the same."""
    common = {"num_train_epochs": 1, "max_steps": 3, "save_steps": 100}
    plain = run_sft(sft_config(small_data, tmp_path / "plain", **common))
    checkpointed = run_sft(sft_config(small_data, tmp_path / "checkpointed", activation_checkpointing=True, **common))
    first = load_file(str(plain / "adapter_model.safetensors"))
    second = load_file(str(checkpointed / "adapter_model.safetensors"))
    assert max(first[n].abs().max().item() for n in first if "lora_B" in n) > 1e-3  # it trained
    assert all(torch.allclose(first[n], second[n], atol=1e-5) for n in first)
