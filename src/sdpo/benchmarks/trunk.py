"""Benchmark the shared-trunk cache (`sdpo.lm.trunk`): ranking or generating with and without it, side by side in one process.

One model: the base LM plus a LoRA adapter on its last `lora_layers` decoder layers, the
adapter's B matrices drawn at random so that it changes the scores (as a trained one does).
The same test records throughout. First the base model ranks (or answers) them once with the
cache, which fills it (what the first stage of a pipeline pays). Then, `repeats` times, the
adapted model ranks (answers) them in full and with the cache, the order alternating between
repeats so a slow phase of a shared machine hits both (the cache's one-time exactness check
runs before); medians are reported, with how far the two ways differ (the cache is exact: the
largest log-prob difference, or the number of differing answers, is 0) and the cache's size.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from sdpo.data.datasets import load_split, read_manifest
from sdpo.errors import UserError
from sdpo.evaluation.generation import generate_answers
from sdpo.evaluation.protocols import candidate_logps
from sdpo.io import folder_bytes, write_json
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.precision import cpu_name
from sdpo.lm.trunk import TrunkCache


def benchmark_trunk(model_name: str, data: str | Path, lora_layers: int, n_records: int, repeats: int, batch_size: int,
                    json_out: str | Path, seed: int = 0, protocol: str = "rank") -> dict[str, Any]:
    """Measure `protocol` (rank or generate), write `json_out` and return the results (see the module docstring)."""
    if protocol not in ("rank", "generate"):
        raise UserError(f"--protocol {protocol!r}: choose rank or generate.")
    domain = read_manifest(data).get("domain", "music")
    records = load_split(data, "test", n_records, seed=0)
    set_seed(seed)
    base, tokenizer = load_model(model_name)
    n_layers = base.config.num_hidden_layers
    if not 1 <= lora_layers < n_layers:
        raise UserError(f"--lora_layers must be between 1 and {n_layers - 1}: the layers below the adapter are the trunk, got {lora_layers}.")
    model = add_lora(base, LoraSettings(dropout=0.0, last_layers=lora_layers)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    depth = n_layers - lora_layers

    def run(trunk: TrunkCache | None, some: list | None = None) -> tuple[float, list]:
        way = candidate_logps if protocol == "rank" else generate_answers
        start = time.perf_counter()
        outputs = way(model, tokenizer, some or records, domain, batch_size, progress=False, trunk=trunk)
        return time.perf_counter() - start, outputs

    with tempfile.TemporaryDirectory(prefix="sdpo-trunk-") as folder:
        trunk = TrunkCache(folder, model, depth)
        print(f"[benchmark] filling the cache: the base model, {protocol}, {len(records)} records", flush=True)
        with model.disable_adapter():
            fill_seconds, _ = run(trunk)
        cache_bytes = folder_bytes(folder)
        run(trunk, records[:batch_size])  # the one-time exactness check
        seconds: dict[str, list[float]] = {"full": [], "cached": []}
        outputs: dict[str, list] = {}
        for repeat in range(repeats):
            order = ("full", "cached") if repeat % 2 == 0 else ("cached", "full")
            for way in order:
                elapsed, outputs[way] = run(trunk if way == "cached" else None)
                seconds[way].append(elapsed)
                print(f"[benchmark] repeat {repeat + 1}/{repeats}, {way}: {elapsed:.1f} s", flush=True)
    pairs = list(zip(outputs["full"], outputs["cached"], strict=True))
    difference = ({"max_abs_logp_diff": max(float((a - b).abs().max()) for a, b in pairs)} if protocol == "rank"
                  else {"answers_differing": sum(a != b for a, b in pairs)})
    full, cached = statistics.median(seconds["full"]), statistics.median(seconds["cached"])
    result = {
        "model": model_name,
        "protocol": protocol,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "n_layers": n_layers,
        "lora_layers": lora_layers,
        "trunk_depth": depth,
        "records": len(records),
        "batch_size": batch_size,
        "repeats": repeats,
        "fill_seconds": round(fill_seconds, 3),
        "full_seconds": [round(s, 3) for s in seconds["full"]],
        "cached_seconds": [round(s, 3) for s in seconds["cached"]],
        "full_median_s_per_record": round(full / len(records), 4),
        "cached_median_s_per_record": round(cached / len(records), 4),
        "speedup": round(full / cached, 2),
        "cache_mb_per_record": round(cache_bytes / len(records) / 1e6, 3),
        **difference,
        "cache_used": trunk.usable,  # False if its exactness check failed (then both ways ran in full)
    }
    write_json(json_out, result)
    return result


def format_table(result: dict[str, Any]) -> str:
    ranking = result.get("protocol", "rank") == "rank"
    difference = (f"largest log-prob difference {result['max_abs_logp_diff']:.3g}" if ranking
                  else f"{result['answers_differing']} answers differ")
    return "\n".join([
        f"{'ranking' if ranking else 'generating for'} {result['records']} records, {result['model']}, LoRA on the last {result['lora_layers']} of "
        f"{result['n_layers']} layers ({result['torch_threads']} threads)",
        "| way | s/record (median) |",
        "|---|---|",
        f"| full computation | {result['full_median_s_per_record']:.3f} |",
        f"| cached trunk | {result['cached_median_s_per_record']:.3f} |",
        f"speedup {result['speedup']:.2f}x; filling the cache {result['fill_seconds'] / result['records']:.3f} s/record; "
        f"{result['cache_mb_per_record']:.2f} MB/record on disk; {difference}",
    ])
