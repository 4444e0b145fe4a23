"""Benchmark the shared trunk in training (`sdpo.training.trunk_states`): align steps with and without it, side by side.

One model: the base LM plus LoRA on its last `lora_layers` decoder layers (B drawn at random, no
dropout, so the two ways compute the same function). The same train records and the same
positive + K negatives per record throughout. First the records' trunk states are computed once
(what an align run pays before its first step, reported apart). Then `repeats` times, alternating
which goes first, an S-DPO step (packed forward from the prompt, backward into LoRA; the reference
precomputed, as in training) runs in full and from the shared trunk. Medians are reported, and
how far the two ways differ: the largest log-prob gap and the largest gap in any LoRA gradient.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from sdpo.benchmarks.step import step_answer_indices, step_answers, trunk_lora_model
from sdpo.data.datasets import load_split, read_manifest
from sdpo.data.prompts import TextPrompts
from sdpo.errors import UserError
from sdpo.io import write_json
from sdpo.lm.precision import cpu_name, model_dtype, resolve_bf16
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.training.losses import softmax_dpo_loss
from sdpo.training.trunk_states import RecordTrunk


def benchmark_train_trunk(model_name: str, data: str | Path, lora_layers: int, n_records: int, k: int, repeats: int,
                          json_out: str | Path, bf16: bool | None = None, seed: int = 0) -> dict[str, Any]:
    """Measure align steps both ways, write `json_out` and return the results (see the module docstring)."""
    bf16 = resolve_bf16(bf16)
    records = load_split(data, "train", n_records, seed=0)
    if any(not 1 <= k < len(r.candidates) for r in records):
        raise UserError("--negatives: K must be between 1 and the number of negatives per record.")
    set_seed(seed)
    model, tokenizer, depth = trunk_lora_model(model_name, model_dtype(bf16), lora_layers)
    prompts = TextPrompts(tokenizer, read_manifest(data).get("domain", "music"))
    answers = step_answers(tokenizer, records, k)
    ids = [prompts.ids(r) for r in records]
    packed = pack_answers(ids, answers, tokenizer.pad_token_id)
    packed["trunk_record"] = torch.arange(len(records))
    packed["trunk_answers"] = step_answer_indices(records, k)
    start = time.perf_counter()
    trunk = RecordTrunk.compute(model, tokenizer, records, prompts, depth, batch_size=len(records), progress=False)
    fill_seconds = time.perf_counter() - start

    def step(way: RecordTrunk | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logps, _ = answer_logprobs(model, packed, way)
        reference = torch.zeros_like(logps)
        softmax_dpo_loss(logps[:, 0], logps[:, 1:], reference[:, 0], reference[:, 1:], 1.0).mean().backward()
        return logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    step(None)  # warm-up
    seconds: dict[str, list[float]] = {"full": [], "shared": []}
    outputs = {}
    for repeat in range(repeats):
        for way in (("full", "shared") if repeat % 2 == 0 else ("shared", "full")):
            begin = time.perf_counter()
            outputs[way] = step(trunk if way == "shared" else None)
            seconds[way].append(time.perf_counter() - begin)
            print(f"[benchmark] repeat {repeat + 1}/{repeats}, {way}: {seconds[way][-1]:.2f} s", flush=True)
    (full_logps, full_grads), (shared_logps, shared_grads) = outputs["full"], outputs["shared"]
    full, shared = statistics.median(seconds["full"]), statistics.median(seconds["shared"])
    result = {
        "model": model_name, "protocol": "train", "cpu": cpu_name(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "precision": "bf16" if bf16 else "fp32", "n_layers": depth + lora_layers, "lora_layers": lora_layers, "trunk_depth": depth,
        "records": len(records), "negatives": k, "repeats": repeats,
        "fill_seconds": round(fill_seconds, 3),
        "full_seconds": [round(s, 3) for s in seconds["full"]], "shared_seconds": [round(s, 3) for s in seconds["shared"]],
        "full_median_step_s": round(full, 3), "shared_median_step_s": round(shared, 3), "speedup": round(full / shared, 2),
        "max_abs_logp_diff": float((full_logps - shared_logps).abs().max()),
        "max_abs_grad_diff": max(float((full_grads[n] - shared_grads[n]).abs().max()) for n in full_grads),
        "trunk_mb_per_record": round(sum(s.numel() * s.element_size() for s in trunk.states) / len(records) / 1e6, 3),
    }
    write_json(json_out, result)
    return result


def format_table(result: dict[str, Any]) -> str:
    return "\n".join([
        f"S-DPO steps (K={result['negatives']}, {result['records']} records), {result['model']} ({result['precision']}), LoRA on the last "
        f"{result['lora_layers']} of {result['n_layers']} layers ({result['torch_threads']} threads)",
        "| way | s/step (median) |",
        "|---|---|",
        f"| every layer in every step | {result['full_median_step_s']:.3f} |",
        f"| shared trunk | {result['shared_median_step_s']:.3f} |",
        f"speedup {result['speedup']:.2f}x; the trunk once: {result['fill_seconds'] / result['records']:.3f} s/record, "
        f"{result['trunk_mb_per_record']:.2f} MB/record in memory; largest log-prob gap {result['max_abs_logp_diff']:.2g}, "
        f"largest gradient gap {result['max_abs_grad_diff']:.2g}",
    ])
