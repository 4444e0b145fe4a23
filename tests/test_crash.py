"""Crash-safe resume, the hard way: SIGKILL a training process, restart it with --resume, compare.

An interrupted and resumed run must end with the adapter an uninterrupted run ends with, log
each step once, and leave no half-written file that a later run would trust.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import sdpo

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sdpo.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)


def finish(*args) -> None:
    """Run to the end in this process, on one thread as the killed processes run: only the kill needs a process of its own."""
    result = sdpo(*args, threads=1)
    assert result.returncode == 0, result.stderr[-4000:]


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL `process` as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting to kill"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_same_end(resumed, whole):
    first, second = load_file(str(resumed / "adapter_model.safetensors")), load_file(str(whole / "adapter_model.safetensors"))
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in second)
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps)) == [e for e in range(1, 9)]
    assert not [p for p in resumed.rglob(".*") if p.is_file()]  # no temporary file left behind


SFT = ["sft", "--model", "tiny", "--train_limit", 24, "--max_steps", 8, "--per_device_train_batch_size", 2, "--learning_rate", 5e-2,
       "--logging_steps", 1, "--save_steps", 2, "--save_total_limit", 10, "--disable_tqdm", "true", "--no_bf16"]


def first_checkpoint(folder):
    return lambda: (folder / "checkpoint-2" / "trainer_state.json").is_file()


def test_sft_killed_after_a_checkpoint_resumes_to_the_same_adapter(small_data, tmp_path):
    finish(*SFT, "--data", small_data, "--output_dir", tmp_path / "whole")
    out = tmp_path / "killed"
    kill_when(start(*SFT, "--data", small_data, "--output_dir", out), first_checkpoint(out))
    assert not (out / "adapter_model.safetensors").exists()
    finish(*SFT, "--data", small_data, "--output_dir", out, "--resume")
    assert_same_end(out, tmp_path / "whole")


def test_align_killed_after_a_checkpoint_and_during_the_reference_pass(small_data, tmp_path):
    finish(*SFT, "--data", small_data, "--output_dir", tmp_path / "sft", "--lora_dropout", 0.0)
    align = ["align", "--sft", tmp_path / "sft", "--negatives", 3, "--train_limit", 24, "--max_steps", 8, "--per_device_train_batch_size", 2,
             "--learning_rate", 5e-2, "--logging_steps", 1, "--save_steps", 2, "--save_total_limit", 10, "--disable_tqdm", "true",
             "--no_bf16", "--per_device_eval_batch_size", 1]
    finish(*align, "--output_dir", tmp_path / "whole")
    cache = tmp_path / "sft" / "reference-cache"
    tables = sorted(cache.glob("*.safetensors"))
    assert len(tables) == 1
    for table in tables:
        table.unlink()  # the next run has to compute it again: kill it while it does

    out = tmp_path / "killed"
    process = start(*align, "--output_dir", out)
    kill_when(process, lambda: (out / "sdpo_config.yaml").is_file())  # written just before the reference pass
    assert not list(cache.glob("*.safetensors"))  # nothing half-computed was saved
    stale = list(cache.glob(".*"))  # a kill during the (atomic) save could leave a temporary file, never a table
    assert all(not p.name.endswith(".safetensors") for p in stale)

    process = start(*align, "--output_dir", out, "--overwrite")
    kill_when(process, first_checkpoint(out))
    finish(*align, "--output_dir", out, "--resume")
    assert_same_end(out, tmp_path / "whole")
    assert len(list(cache.glob("*.safetensors"))) == 1 and not list(cache.glob("*.progress.jsonl.gz"))  # the journal has served


@pytest.mark.parametrize("garbage", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"logps\": trunc"])
def test_a_damaged_reference_table_is_recomputed_not_trusted(tiny, small_data, tmp_path, garbage):
    from sdpo.data.datasets import load_split
    from sdpo.training.reference import cached_reference_logps, compute_reference_logps

    model, tokenizer = tiny
    records = load_split(small_data, "val", 2)
    path = tmp_path / "table.safetensors"
    path.write_bytes(garbage)
    calls = []

    def compute():
        calls.append(1)
        return compute_reference_logps(model, tokenizer, records, "music", batch_size=2)

    table = cached_reference_logps([path], "key", compute)
    assert calls == [1] and table.shape == (2, 20)
    assert torch.equal(cached_reference_logps([path], "key", lambda: pytest.fail("recomputed")), table)
