"""Benchmark fp32 against bf16, side by side in one process: speed and what bf16 changes.

Measured on the same model, records and LoRA initialisation in both precisions:

- records per second of a full training step (forward, backward, AdamW step): SFT (the
  target only) and S-DPO at each K (target + K negatives, reference log-probs precomputed,
  as `sdpo align` does by default);
- records per second of rank evaluation (all candidates of each test record scored);
- on those ranked records: the largest and mean absolute log-prob difference between the
  two precisions, and top-1 agreement (the share of records whose best candidate is the same).

Step timings alternate between the precisions (fp32 first on even repeats, bf16 first on odd
ones), so a slow phase of a shared machine hits both; medians are reported. Whether the CPU
has native bf16 instructions, and where it has, how much faster it multiplies bf16 matrices
(`sdpo.lm.precision.cpu_bf16_matmul_speedup`, which decides sdpo's default), are recorded with
the results: without them (no AVX512-BF16 or AMX on x86) bf16 is emulated and slower.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from sdpo.data.datasets import load_split, read_manifest
from sdpo.data.prompts import encode_answer, record_prompt_ids
from sdpo.evaluation.metrics import ranked_indices
from sdpo.evaluation.protocols import candidate_logps
from sdpo.io import write_json
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.precision import bf16_supported, cpu_bf16_matmul_speedup, cpu_has_bf16, cpu_name, model_dtype
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.training.losses import softmax_dpo_loss

PRECISIONS = ("fp32", "bf16")


class Trainee:
    """A LoRA model in one precision with its optimizer: runs SFT and S-DPO steps."""

    def __init__(self, model_name: str, bf16: bool, seed: int = 0):
        set_seed(seed)  # the same LoRA initialisation in both precisions
        base, self.tokenizer = load_model(model_name, dtype=model_dtype(bf16))
        self.model = add_lora(base, LoraSettings()).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)

    def step(self, packed: dict[str, torch.Tensor], reference: torch.Tensor | None) -> None:
        """One optimizer step: token-mean NLL of the answers (SFT), or the S-DPO loss against `reference` [B, 1+K]."""
        logps, n_tokens = answer_logprobs(self.model, packed)
        if reference is None:
            loss = -logps.sum() / n_tokens.sum()
        else:
            loss = softmax_dpo_loss(logps[:, 0], logps[:, 1:], reference[:, 0], reference[:, 1:], 1.0).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def reference(self, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        self.model.eval()
        logps, _ = answer_logprobs(self.model, packed)
        self.model.train()
        return logps


def _packed(tokenizer, records, domain: str, k: int | None) -> dict[str, torch.Tensor]:
    """SFT batch (k None: the target only) or S-DPO batch (target + the first k negatives)."""
    prompts = [record_prompt_ids(tokenizer, r, domain) for r in records]
    titles = [[r.target] + ([] if k is None else r.negatives[:k]) for r in records]
    answers = [[encode_answer(tokenizer, t) for t in row] for row in titles]
    return pack_answers(prompts, answers, tokenizer.pad_token_id)


def _time_steps(trainees: dict[str, Trainee], batches: dict[str, dict], references: dict[str, torch.Tensor | None], repeats: int) -> dict[str, float]:
    """Median seconds of one step per precision, the precisions alternating."""
    for name, trainee in trainees.items():
        trainee.step(batches[name], references[name])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in trainees}
    for repeat in range(repeats):
        order = PRECISIONS if repeat % 2 == 0 else PRECISIONS[::-1]
        for name in order:
            start = time.perf_counter()
            trainees[name].step(batches[name], references[name])
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def benchmark_precision(model_name: str, data: str | Path, ks: list[int], n_records: int, repeats: int, rank_records: int,
                        batch_size: int, json_out: str | Path) -> dict[str, Any]:
    """Measure, write `json_out` and return the results (see the module docstring)."""
    domain = read_manifest(data).get("domain", "music")
    train = load_split(data, "train", n_records, seed=0)
    test = load_split(data, "test", rank_records, seed=0)
    trainees = {name: Trainee(model_name, name == "bf16") for name in PRECISIONS}
    tokenizer = trainees["fp32"].tokenizer
    steps = []
    for k in [None, *ks]:
        label = "sft" if k is None else f"s-dpo K={k}"
        print(f"[benchmark] {label} step, {n_records} records", flush=True)
        batches = {name: _packed(tokenizer, train, domain, k) for name in PRECISIONS}
        references = {name: None if k is None else trainees[name].reference(batches[name]) for name in PRECISIONS}
        seconds = _time_steps(trainees, batches, references, repeats)
        steps.append(_speed_row(label, n_records, seconds))

    scores, seconds = {}, {}
    for name in PRECISIONS:
        print(f"[benchmark] ranking {len(test)} test records in {name}", flush=True)
        model = trainees[name].model
        with model.disable_adapter():  # the base model: the steps above moved the LoRA weights apart
            start = time.perf_counter()
            scores[name] = candidate_logps(model, tokenizer, test, domain, batch_size, progress=False)
            seconds[name] = time.perf_counter() - start
    gaps = torch.cat([(a - b).abs() for a, b in zip(scores["fp32"], scores["bf16"], strict=True)])
    same_top = [ranked_indices(a.tolist(), r.id)[0] == ranked_indices(b.tolist(), r.id)[0]
                for r, a, b in zip(test, scores["fp32"], scores["bf16"], strict=True)]
    result = {
        "model": model_name,
        "cpu": cpu_name(),
        "cpu_native_bf16": cpu_has_bf16(),
        "cpu_bf16_matmul_speedup": round(cpu_bf16_matmul_speedup(), 2) if cpu_has_bf16() else None,
        "bf16_default": bf16_supported(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "records_per_step": n_records,
        "repeats": repeats,
        "steps": steps,
        "rank": _speed_row("rank evaluation", len(test), seconds),
        "agreement": {
            "records": len(test),
            "max_abs_logp_diff": float(gaps.max()),
            "mean_abs_logp_diff": float(gaps.mean()),
            "top1_agreement": sum(same_top) / len(same_top),
        },
    }
    write_json(json_out, result)
    return result


def _speed_row(label: str, n_records: int, seconds: dict[str, float]) -> dict[str, Any]:
    return {
        "what": label,
        "records": n_records,
        "fp32_seconds": round(seconds["fp32"], 3),
        "bf16_seconds": round(seconds["bf16"], 3),
        "fp32_records_per_s": round(n_records / seconds["fp32"], 3),
        "bf16_records_per_s": round(n_records / seconds["bf16"], 3),
        "bf16_speedup": round(seconds["fp32"] / seconds["bf16"], 2),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = ["| what | records | fp32 s | bf16 s | fp32 records/s | bf16 records/s | bf16 speedup |", "|---|---|---|---|---|---|---|"]
    for row in [*result["steps"], result["rank"]]:
        lines.append(f"| {row['what']} | {row['records']} | {row['fp32_seconds']} | {row['bf16_seconds']} | "
                     f"{row['fp32_records_per_s']} | {row['bf16_records_per_s']} | {row['bf16_speedup']} |")
    agreement = result["agreement"]
    lines.append("")
    lines.append(f"log-prob |fp32 - bf16| over {agreement['records']} records x all candidates: max {agreement['max_abs_logp_diff']:.3g}, "
                 f"mean {agreement['mean_abs_logp_diff']:.3g}; top-1 agreement {agreement['top1_agreement']:.3f}")
    native = "yes" if result["cpu_native_bf16"] else "no"
    if result.get("cpu_bf16_matmul_speedup") is not None:
        native += f", bf16 matmul at {result['cpu_bf16_matmul_speedup']}x fp32"
    lines.append(f"CPU: {result['cpu']} (native bf16: {native}; sdpo's default here: {'bf16' if result['bf16_default'] else 'fp32'})")
    return "\n".join(lines)
