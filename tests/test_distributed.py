"""Two CPU processes (torchrun, gloo) train exactly as one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import sdpo

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, *args) -> None:
    """One process: this one (on one thread, as each torchrun process); several: torchrun, which is the point."""
    if processes == 1:
        result = sdpo(*args, threads=1)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port()),
                   "-m", "sdpo.cli", *map(str, args)]
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def train_logs(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if '"loss"' in line]


def assert_same_run(one, two):
    first, second = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-5), name
    # and training moved the adapter far beyond that tolerance (LoRA B starts at 0)
    assert max(first[n].abs().max().item() for n in first if "lora_B" in n) > 1e-3
    logs_one, logs_two = train_logs(one), train_logs(two)
    assert [e["step"] for e in logs_one] == [e["step"] for e in logs_two]
    assert [e["loss"] for e in logs_one] == pytest.approx([e["loss"] for e in logs_two], abs=1e-5)


def test_two_processes_match_one_with_the_same_global_batch(small_data, tmp_path):
    common = ["--model", "tiny", "--data", small_data, "--train_limit", 16, "--max_steps", 3, "--learning_rate", 5e-3,
              "--lora_dropout", 0.0, "--logging_steps", 1, "--save_steps", 100, "--disable_tqdm", "true", "--no_bf16",
              "--use_cpu", "true"]  # on a GPU host too: the one-process run shares this process, whose CUDA stays visible
    launch(1, "sft", *common, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--output_dir", tmp_path / "sft-1")
    launch(2, "sft", *common, "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--output_dir", tmp_path / "sft-2")
    assert_same_run(tmp_path / "sft-1", tmp_path / "sft-2")
    # files are written once: one config, one log line per step
    assert len(train_logs(tmp_path / "sft-2")) == 3

    # with DynamicPO: its choices are per record, so they are the same however the batch is split
    align = ["align", "--sft", tmp_path / "sft-1", "--negatives", 3, "--max_steps", 3, "--learning_rate", 5e-3, "--logging_steps", 1,
             "--save_steps", 100, "--disable_tqdm", "true", "--train_limit", 16, "--no_bf16", "--use_cpu", "true",
             "--boundary_negatives", "--dynamic_beta"]
    launch(1, *align, "--per_device_train_batch_size", 4, "--output_dir", tmp_path / "sdpo-1")
    launch(2, *align, "--per_device_train_batch_size", 2, "--output_dir", tmp_path / "sdpo-2")
    assert_same_run(tmp_path / "sdpo-1", tmp_path / "sdpo-2")
    for one, two in zip(train_logs(tmp_path / "sdpo-1"), train_logs(tmp_path / "sdpo-2"), strict=True):
        assert one["dynamicpo/selected"] == pytest.approx(two["dynamicpo/selected"], abs=1e-6)
        assert one["dynamicpo/beta"] == pytest.approx(two["dynamicpo/beta"], abs=1e-5)
    # the reference table was computed once, by the first run; the second read it from the SFT run's cache
    assert len(list((tmp_path / "sft-1" / "reference-cache").glob("*.safetensors"))) == 1


def test_two_processes_match_one_with_collaborative_tokens(small_data, sasrec_dir, tmp_path):
    """The projectors train outside the model's forward call; DDP still averages their gradients as one process sums them."""
    common = ["--model", "tiny", "--data", small_data, "--train_limit", 8, "--max_steps", 2, "--learning_rate", 5e-3,
              "--projector_learning_rate", 1e-2, "--collaborative", sasrec_dir, "--collaborative_score", "--lora_dropout", 0.0,
              "--logging_steps", 1, "--save_steps", 100, "--disable_tqdm", "true", "--no_bf16", "--use_cpu", "true"]
    launch(1, "sft", *common, "--per_device_train_batch_size", 4, "--output_dir", tmp_path / "sft-1")
    launch(2, "sft", *common, "--per_device_train_batch_size", 2, "--output_dir", tmp_path / "sft-2")
    assert_same_run(tmp_path / "sft-1", tmp_path / "sft-2")
    assert any("collaborative_tokens" in name for name in load_file(str(tmp_path / "sft-2" / "adapter_model.safetensors")))

    align = ["align", "--sft", tmp_path / "sft-1", "--negatives", 3, "--max_steps", 2, "--learning_rate", 5e-3, "--logging_steps", 1,
             "--save_steps", 100, "--disable_tqdm", "true", "--train_limit", 8, "--no_bf16", "--use_cpu", "true", "--sft_weight", 0.5]
    launch(1, *align, "--per_device_train_batch_size", 4, "--output_dir", tmp_path / "sdpo-1")
    launch(2, *align, "--per_device_train_batch_size", 2, "--output_dir", tmp_path / "sdpo-2")
    assert_same_run(tmp_path / "sdpo-1", tmp_path / "sdpo-2")
    # the SFT term is in the loss, and every logged term is the whole batch's, not the main process's half
    for one, two in zip(train_logs(tmp_path / "sdpo-1"), train_logs(tmp_path / "sdpo-2"), strict=True):
        assert one["loss"] == pytest.approx(one["loss/preference"] + 0.5 * one["loss/sft"], abs=1e-4)
        for key in ("loss/preference", "loss/sft", "rewards/margins", "logps/chosen"):
            assert one[key] == pytest.approx(two[key], abs=1e-5), key
