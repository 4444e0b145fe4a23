"""Benchmark faster greedy generation on a CPU: each way against today's, side by side in one process.

One text adapter (an SFT or align run) answers the same seeded draw of records in every way:

- ``today``: records in their order, 20 new tokens at most (what `sdpo evaluate --protocol generate` does);
- ``by_length``: records batched in order of prompt length, so a batch pads little;
- ``stop``: each batch generates at most its longest candidate answer's tokens (`generate_answers`' ``stop_after_titles``);
- ``merged``: the LoRA weights merged into the base weights (PEFT's ``merge_and_unload``), so no LoRA matmuls run;
- ``combined``: all three.

Each way runs `repeats` times, the order of the ways rotating between repeats so a slow phase of a
shared machine hits every way; medians are reported. Beside the speed, what each way changes:
answers that differ from today's, and HR@1 and ValidRatio (the paper's substring rule) with the
paired difference of hits against today's.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from sdpo.data.datasets import load_split, read_manifest
from sdpo.errors import UserError
from sdpo.evaluation.generation import generate_answers, score_generations
from sdpo.evaluation.stats import paired_difference
from sdpo.io import write_json
from sdpo.lm.models import load_model
from sdpo.lm.precision import cpu_name
from sdpo.training.runs import read_run_config

WAYS = ("today", "by_length", "stop", "merged", "combined")


def benchmark_generation(model_name: str, adapter: str | Path, data: str | Path, n_records: int, repeats: int, batch_size: int,
                         json_out: str | Path, split: str = "test", seed: int = 0) -> dict[str, Any]:
    """Measure every way (module docstring) on `n_records` of `split` drawn with `seed`; write `json_out` and return the results."""
    settings = read_run_config(adapter, "an sdpo sft or align run folder")
    if settings.get("collaborative"):
        raise UserError(f"{adapter}: a collaborative run; this benchmark merges LoRA into the weights, which text runs only allow. "
                        "Give a text run (adapters/lastfm-sft-smollm2-135m, say).")
    domain = read_manifest(data).get("domain", "music")
    prompt_seed = settings.get("prompt_seed") or 0
    records = load_split(data, split, n_records, seed)
    model, tokenizer = load_model(model_name, adapter)
    model.eval()
    merged = copy.deepcopy(model).merge_and_unload().eval()
    ways = {
        "today": (model, {}),
        "by_length": (model, {"by_length": True}),
        "stop": (model, {"stop_after_titles": True}),
        "merged": (merged, {}),
        "combined": (merged, {"by_length": True, "stop_after_titles": True}),
    }
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    answers: dict[str, list[str]] = {}
    for repeat in range(repeats):
        order = WAYS[repeat % len(WAYS):] + WAYS[:repeat % len(WAYS)]
        for way in order:
            lm, options = ways[way]
            start = time.perf_counter()
            answers[way] = generate_answers(lm, tokenizer, records, domain, batch_size, prompt_seed, progress=False, **options)
            seconds[way].append(time.perf_counter() - start)
            print(f"[benchmark] repeat {repeat + 1}/{repeats}, {way}: {seconds[way][-1]:.1f} s", flush=True)
    scored = {way: score_generations(records, answers[way]) for way in WAYS}
    hits = {way: [float(p["hit"]) for p in scored[way].predictions] for way in WAYS}
    today = statistics.median(seconds["today"])
    rows = []
    for way in WAYS:
        median = statistics.median(seconds[way])
        rows.append({
            "way": way,
            "seconds": [round(s, 3) for s in seconds[way]],
            "median_s_per_record": round(median / len(records), 4),
            "speedup": round(today / median, 2),
            "answers_differing": sum(a != b for a, b in zip(answers[way], answers["today"], strict=True)),
            "hr@1": scored[way].metrics["hr@1"],
            "valid_ratio": scored[way].metrics["valid_ratio"],
            "hr@1_minus_today": paired_difference(hits[way], hits["today"]),
        })
    result = {
        "model": model_name, "adapter": str(adapter), "data": str(data), "split": split, "records": len(records), "seed": seed,
        "batch_size": batch_size, "repeats": repeats, "cpu": cpu_name(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "ways": rows,
    }
    write_json(json_out, result)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"greedy answers for {result['records']} {result['split']} records, {result['model']} + {result['adapter']} "
             f"({result['torch_threads']} threads, batches of {result['batch_size']})",
             "| way | s/record (median) | speedup | answers differing | HR@1 | ValidRatio | HR@1 − today's (paired) |",
             "|---|---|---|---|---|---|---|"]
    for row in result["ways"]:
        diff = row["hr@1_minus_today"]
        lines.append(f"| {row['way']} | {row['median_s_per_record']:.3f} | {row['speedup']:.2f}x | {row['answers_differing']} | "
                     f"{row['hr@1']:.3f} | {row['valid_ratio']:.3f} | {diff['difference']:+.3f} [{diff['interval'][0]:+.3f}, {diff['interval'][1]:+.3f}] |")
    return "\n".join(lines)
