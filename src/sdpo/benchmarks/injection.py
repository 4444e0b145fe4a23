"""Benchmark late injection against injection at the input: an S-DPO training step and ranking, side by side.

One model: the base LM with collaborative projectors and LoRA on its last `lora_layers` decoder
layers (B drawn at random, no dropout), in one process. The two ways differ only in where the
soft tokens enter (`sdpo.lm.soft_tokens.set_injection_layer`):

- ``input``: at the input embeddings, as `sdpo sft --collaborative` does by default. Every layer
  sees the soft tokens, so a step runs all layers forward, and backward down to the projectors at
  the input; a ranking runs every layer for every stage.
- ``late``: at the first LoRA layer (`--collaborative_inject lora`), every layer run in every step:
  backward stops at that layer, as nothing below it trains. Ranking fills the trunk cache, as the
  first evaluated stage of a pipeline does (`sdpo.lm.trunk.TrunkCache`).
- ``late_shared``: the same, with the layers below it, which read the prompt as text and hold the
  same states for every stage and step, computed once per record: an align step assembles its rows
  from them (`sdpo.training.trunk_states.RecordTrunk`, what `--share_trunk` does; the one-time cost
  is reported apart), and ranking reads them from the trunk cache (every stage after the first).

Steps run `repeats` times, the order of the ways rotating; medians are reported. ``late_shared``
computes what ``late`` does: the largest log-prob and gradient gaps between them, and between the
cache's filling and reading passes, are reported. ``input`` is another model (the soft tokens meet
other states): its largest log-prob gap to ``late`` is reported only to show that the tokens moved.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from sdpo.baselines.collaborative import CollaborativeModel
from sdpo.baselines.prompts import CollaborativePrompts
from sdpo.benchmarks.step import step_answer_indices, step_answers, trunk_lora_model
from sdpo.data.datasets import load_split, read_manifest
from sdpo.errors import UserError
from sdpo.evaluation.protocols import candidate_logps
from sdpo.io import write_json
from sdpo.lm.precision import cpu_name, model_dtype, resolve_bf16
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.lm.soft_tokens import MODULE, SoftTokenSpec, set_injection_layer
from sdpo.lm.trunk import TrunkCache
from sdpo.training.losses import softmax_dpo_loss
from sdpo.training.trunk_states import RecordTrunk

WAYS = ("input", "late", "late_shared")  # soft tokens at the input; at the first LoRA layer, every layer run; that, the trunk shared


def benchmark_injection(model_name: str, data: str | Path, collaborative: str | Path, lora_layers: int, n_records: int, k: int,
                        repeats: int, rank_records: int, batch_size: int, json_out: str | Path, bf16: bool | None = None,
                        seed: int = 0) -> dict[str, Any]:
    """Measure every way (module docstring), write `json_out` and return the results."""
    bf16 = resolve_bf16(bf16)
    records = load_split(data, "train", n_records, seed=seed)
    if any(not 1 <= k < len(r.candidates) for r in records):
        raise UserError("--negatives: K must be between 1 and the number of negatives per record.")
    source = CollaborativeModel.load(collaborative)
    set_seed(seed)
    model, tokenizer, depth = trunk_lora_model(model_name, model_dtype(bf16), lora_layers, SoftTokenSpec(source.dim, True))
    prompts = CollaborativePrompts(tokenizer, read_manifest(data).get("domain", "music"), 0, source, score=True)
    ids = [prompts.ids(r) for r in records]
    packed = {**pack_answers(ids, step_answers(tokenizer, records, k), tokenizer.pad_token_id), **prompts.soft_inputs(records, ids)}
    packed["trunk_record"] = torch.arange(len(records))
    packed["trunk_answers"] = step_answer_indices(records, k)
    set_injection_layer(model, depth)
    record_trunk = RecordTrunk.compute(model, tokenizer, records, prompts, depth, batch_size=len(records), progress=False)

    def step(way: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        set_injection_layer(model, 0 if way == "input" else depth)
        model.zero_grad(set_to_none=True)
        logps, _ = answer_logprobs(model, packed, record_trunk if way == "late_shared" else None)
        reference = torch.zeros_like(logps)
        softmax_dpo_loss(logps[:, 0], logps[:, 1:], reference[:, 0], reference[:, 1:], 1.0).mean().backward()
        return logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    for way in WAYS:  # warm-up
        step(way)
    start = time.perf_counter()  # the states below the injection layer, computed once (timed warm)
    record_trunk = RecordTrunk.compute(model, tokenizer, records, prompts, depth, batch_size=len(records), progress=False)
    fill_seconds = time.perf_counter() - start
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    outputs = {}
    for repeat in range(repeats):
        for way in WAYS[repeat % len(WAYS):] + WAYS[:repeat % len(WAYS)]:
            begin = time.perf_counter()
            outputs[way] = step(way)
            seconds[way].append(time.perf_counter() - begin)
            print(f"[benchmark] step, repeat {repeat + 1}/{repeats}, {way}: {seconds[way][-1]:.2f} s", flush=True)
    (late_logps, late_grads), (shared_logps, shared_grads) = outputs["late"], outputs["late_shared"]
    ranking = _ranking_seconds(model, tokenizer, load_split(data, "test", rank_records, seed=seed), prompts, depth, batch_size)
    medians = {way: statistics.median(seconds[way]) for way in WAYS}
    result = {
        "model": model_name, "collaborative": str(collaborative), "cpu": cpu_name(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "precision": "bf16" if bf16 else "fp32", "n_layers": depth + lora_layers,
        "lora_layers": lora_layers, "injection_layer": depth, "records_per_step": len(records), "negatives": k, "repeats": repeats,
        "step": {
            **{f"{way}_seconds": [round(s, 3) for s in seconds[way]] for way in WAYS},
            **{f"{way}_median_s": round(medians[way], 3) for way in WAYS},
            "speedup": round(medians["input"] / medians["late_shared"], 2),
            "late_trunk_once_s_per_record": round(fill_seconds / len(records), 3),
            "shared_max_abs_logp_diff": float((late_logps - shared_logps).abs().max()),
            "input_against_late_max_abs_logp_diff": float((outputs["input"][0] - late_logps).abs().max()),  # > 0: another model
            "shared_max_abs_grad_diff": max(float((late_grads[n] - shared_grads[n]).abs().max()) for n in late_grads),
            "projector_gradients": {way: any(MODULE in n and g.abs().sum() > 0 for n, g in outputs[way][1].items()) for way in WAYS},
        },
        "rank": ranking,
    }
    write_json(json_out, result)
    return result


def _ranking_seconds(model, tokenizer, records, prompts, depth: int, batch_size: int) -> dict[str, Any]:
    """Seconds per record ranking `records`: input injection, then late injection filling the trunk cache and reading it,
    as a pipeline's stages do one after another (after one untimed warm-up batch)."""
    model.eval()

    def rank(trunk: TrunkCache | None = None, chosen: list = records) -> list[torch.Tensor]:
        return candidate_logps(model, tokenizer, chosen, prompts.domain, batch_size, progress=False, trunk=trunk, prompts=prompts)

    set_injection_layer(model, 0)
    rank(chosen=records[:batch_size])
    timed, scores, hits = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="sdpo-inject-") as folder:
        for way, layer, cache in (("input", 0, None), ("late_fill", depth, folder), ("late_read", depth, folder)):
            set_injection_layer(model, layer)
            trunk = TrunkCache(cache, model, depth) if cache else None
            if way == "late_read":
                trunk.checked = True  # the filling pass's files are this model's: time the reading alone
            start = time.perf_counter()
            scores[way] = rank(trunk)
            timed[way] = time.perf_counter() - start
            hits[way] = trunk.hits if trunk else 0
            print(f"[benchmark] ranking {len(records)} records, {way}: {timed[way]:.1f} s", flush=True)
    per_record = {f"{way}_s_per_record": round(s / len(records), 3) for way, s in timed.items()}
    read_gap = max(float((a - b).abs().max()) for a, b in zip(scores["late_fill"], scores["late_read"], strict=True))
    return {"records": len(records), "batch_size": batch_size, **per_record, "speedup_reading": round(timed["input"] / timed["late_read"], 2),
            "read_max_abs_logp_diff": read_gap, "batches": -(-len(records) // batch_size), "batches_read_from_cache": hits["late_read"],
            "batches_read_while_filling": hits["late_fill"]}


def format_table(result: dict[str, Any]) -> str:
    step, rank = result["step"], result["rank"]
    return "\n".join([
        f"collaborative S-DPO (K={result['negatives']}, {result['records_per_step']} records a step), {result['model']} "
        f"({result['precision']}), LoRA on the last {result['lora_layers']} of {result['n_layers']} layers "
        f"({result['torch_threads']} threads)",
        "| soft tokens enter | s/step (median) | ranking s/record |",
        "|---|---|---|",
        f"| the input (layer 0) | {step['input_median_s']:.3f} | {rank['input_s_per_record']:.3f} |",
        f"| layer {result['injection_layer']}, every layer run | {step['late_median_s']:.3f} | "
        f"{rank['late_fill_s_per_record']:.3f} (filling the trunk cache) |",
        f"| layer {result['injection_layer']}, shared trunk | {step['late_shared_median_s']:.3f} | {rank['late_read_s_per_record']:.3f} |",
        f"step speedup {step['speedup']:.2f}x (the trunk once: {step['late_trunk_once_s_per_record']:.3f} s/record); ranking speedup "
        f"{rank['speedup_reading']:.2f}x for every stage after the first; shared against every layer run: log-prob gap "
        f"{step['shared_max_abs_logp_diff']:.2g}, gradient gap {step['shared_max_abs_grad_diff']:.2g}, cache read gap "
        f"{rank['read_max_abs_logp_diff']:.2g}",
    ])
