"""Benchmark a training step of the ID baselines with and without `keep_freed_memory`.

The malloc setting is process-wide and cannot be undone, so every measurement runs in a
fresh child process (``python -m sdpo.benchmarks.baseline``); the two settings alternate,
repeat after repeat, so both see the same machine load. A child times `steps` training
steps (batch 256 of the dataset's train records, after 3 warm-up steps) and reports the
median step time; each setting's number is the median over repeats.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

SETTINGS = ("default malloc", "keep freed memory")


def time_steps(model_name: str, data: str, steps: int, keep: bool) -> float:
    """Median seconds of one training step, in this process."""
    from sdpo.baselines.items import ItemTable
    from sdpo.baselines.train import BaselineConfig, build_model, encode, train_step
    from sdpo.data.datasets import load_split
    from sdpo.lm.allocator import keep_freed_memory

    if keep and not keep_freed_memory():
        raise RuntimeError("this C library does not take the malloc setting")
    config = BaselineConfig(model=model_name, data=data)
    records = load_split(data, "train")
    items = ItemTable.from_records(records)
    train = encode(records, items, config.max_len)
    torch.manual_seed(0)
    model = build_model(model_name, len(items), config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(3 + steps):
        batch = order[step * config.batch_size : (step + 1) * config.batch_size]
        started = time.perf_counter()
        train_step(model, optimizer, train.histories[batch], train.targets[batch])
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:])


def benchmark_baselines(models: list[str], data: str, steps: int = 20, repeats: int = 3) -> list[dict[str, Any]]:
    results = []
    for model_name in models:
        seconds: dict[str, list[float]] = {s: [] for s in SETTINGS}
        for repeat in range(repeats):
            order = SETTINGS if repeat % 2 == 0 else SETTINGS[::-1]
            for setting in order:
                command = [sys.executable, "-m", "sdpo.benchmarks.baseline", model_name, data, str(steps), str(int(setting == SETTINGS[1]))]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                seconds[setting].append(json.loads(out.splitlines()[-1])["step_seconds"])
        default, kept = (statistics.median(seconds[s]) for s in SETTINGS)
        results.append({"model": model_name, "default_step_s": round(default, 4), "keep_freed_step_s": round(kept, 4),
                        "speedup": round(default / kept, 2), "all_step_s": seconds})
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    lines = ["| model | default malloc s/step | keep freed memory s/step | speedup |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['default_step_s']} | {r['keep_freed_step_s']} | {r['speedup']} |" for r in results]
    return "\n".join(lines)


def save_results(path: str | Path, data: str, steps: int, repeats: int, results: list[dict[str, Any]]) -> None:
    from sdpo.io import write_json

    write_json(path, {"data": data, "steps": steps, "repeats": repeats, "torch_threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":  # child process: MODEL DATA STEPS KEEP(0/1)
    model_name, data, steps, keep = sys.argv[1:5]
    print(json.dumps({"step_seconds": time_steps(model_name, data, int(steps), keep == "1")}))
