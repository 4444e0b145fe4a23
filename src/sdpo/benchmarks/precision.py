"""Benchmark fp32 against bf16, side by side in one process: speed and what bf16 changes.

Three precisions on the same model, records and LoRA initialisation (`VARIANTS`): fp32; bf16,
sdpo's (bf16 base weights and decoder, the LM head in fp32, `sdpo.lm.head`); and bf16_all, the
bf16 sdpo computed before the fp32 head (the head in bf16 too, `sdpo.lm.head.low_precision_head`).
Measured in each:

- records per second of a full training step (forward, backward, AdamW step): SFT (the
  target only) and S-DPO at each K (target + K negatives, reference log-probs precomputed,
  as `sdpo align` does by default);
- records per second of rank evaluation (all candidates of each test record scored);
- on those ranked records, each bf16 against fp32: the largest and mean absolute log-prob
  difference, and top-1 agreement (the share of records whose best candidate is the same);
- the packed kernel against one sequence per answer: the largest absolute difference of the
  summed log-probs of a few test records' target and K random negatives, drawn as
  `sdpo benchmark step` draws them (the base model, no gradients).

Step timings rotate the order of the precisions from one repeat to the next, so a slow phase
of a shared machine hits all of them; medians are reported. Whether the CPU has native bf16
instructions, and where it has, how much faster it multiplies bf16 matrices
(`sdpo.lm.precision.cpu_bf16_matmul_speedup`, which decides sdpo's default), are recorded with
the results: without them (no AVX512-BF16 or AMX on x86) bf16 is emulated and slower.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from sdpo.benchmarks.step import naive_logps, naive_sequences, step_answers
from sdpo.data.datasets import load_split, read_manifest
from sdpo.data.prompts import encode_answer, record_prompt_ids
from sdpo.data.records import Record
from sdpo.evaluation.metrics import ranked_indices
from sdpo.evaluation.protocols import candidate_logps
from sdpo.io import write_json
from sdpo.lm.head import low_precision_head
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.precision import bf16_supported, cpu_bf16_matmul_speedup, cpu_has_bf16, cpu_name, model_dtype
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.training.losses import softmax_dpo_loss

VARIANTS = {
    "fp32": "fp32 weights and compute",
    "bf16": "bf16 base weights and decoder, fp32 LM head: sdpo's bf16",
    "bf16_all": "bf16 base weights, decoder and LM head: sdpo's bf16 before the fp32 head",
}
LOW_PRECISION_VARIANTS = ("bf16", "bf16_all")


class Trainee:
    """A LoRA model in one of the `VARIANTS` with its optimizer: runs SFT and S-DPO steps, and scores, in that precision."""

    def __init__(self, model_name: str, variant: str, seed: int = 0):
        set_seed(seed)  # the same LoRA initialisation in every precision
        base, self.tokenizer = load_model(model_name, dtype=model_dtype(variant != "fp32"))
        self.model = add_lora(base, LoraSettings()).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.variant = variant

    def precision(self) -> AbstractContextManager:
        """The block in which the model computes as its variant says (bf16_all: the LM head in bf16 too)."""
        return low_precision_head() if self.variant == "bf16_all" else nullcontext()

    def step(self, packed: dict[str, torch.Tensor], reference: torch.Tensor | None) -> None:
        """One optimizer step: token-mean NLL of the answers (SFT), or the S-DPO loss against `reference` [B, 1+K]."""
        with self.precision():
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
        """[B, A] summed log-probs of the packed answers, in eval mode: the S-DPO steps' reference."""
        self.model.eval()
        with self.precision():
            logps, _ = answer_logprobs(self.model, packed)
        self.model.train()
        return logps

    @torch.no_grad()
    def rank(self, records: list[Record], domain: str, batch_size: int) -> tuple[list[torch.Tensor], float]:
        """Per record, the base model's log-probs [C] of its candidates (the steps moved the LoRA weights apart), and the seconds taken."""
        with self.model.disable_adapter(), self.precision():
            start = time.perf_counter()
            scores = candidate_logps(self.model, self.tokenizer, records, domain, batch_size, progress=False)
            return scores, time.perf_counter() - start

    @torch.no_grad()
    def packed_against_naive(self, records: list[Record], domain: str, k: int) -> float:
        """Largest |packed - one sequence per answer| summed log-prob of `records`' target and K random negatives (the base model).

        The answers are those `sdpo benchmark step` draws; each record's 1+K sequences run as one batch.
        """
        tokenizer, pad = self.tokenizer, self.tokenizer.pad_token_id
        prompts = [record_prompt_ids(tokenizer, r, domain) for r in records]
        answers = step_answers(tokenizer, records, k)
        self.model.eval()
        with self.model.disable_adapter(), self.precision():
            packed, _ = answer_logprobs(self.model, pack_answers(prompts, answers, pad))  # [B, 1+K]
            naive = [naive_logps(self.model, *naive_sequences([prompt], [row], pad)) for prompt, row in zip(prompts, answers, strict=True)]
        self.model.train()
        return float((packed - torch.stack(naive)).abs().max())


def _packed(tokenizer, records, domain: str, k: int | None) -> dict[str, torch.Tensor]:
    """SFT batch (k None: the target only) or S-DPO batch (target + the first k negatives)."""
    prompts = [record_prompt_ids(tokenizer, r, domain) for r in records]
    titles = [[r.target] + ([] if k is None else r.negatives[:k]) for r in records]
    answers = [[encode_answer(tokenizer, t) for t in row] for row in titles]
    return pack_answers(prompts, answers, tokenizer.pad_token_id)


def _time_steps(trainees: dict[str, Trainee], batch: dict[str, torch.Tensor], references: dict[str, torch.Tensor | None],
                repeats: int) -> dict[str, float]:
    """Median seconds of one step per precision, the order of the precisions rotating from one repeat to the next."""
    for name, trainee in trainees.items():
        trainee.step(batch, references[name])  # warm-up
    names = list(trainees)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            trainees[name].step(batch, references[name])
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def _agreement(test: list[Record], scores: dict[str, list[torch.Tensor]], variant: str) -> dict[str, float]:
    """`variant`'s log-probs against fp32's over every candidate: largest and mean |difference|, and top-1 agreement."""
    gaps = torch.cat([(a - b).abs() for a, b in zip(scores["fp32"], scores[variant], strict=True)])
    same_top = [ranked_indices(a.tolist(), r.id)[0] == ranked_indices(b.tolist(), r.id)[0]
                for r, a, b in zip(test, scores["fp32"], scores[variant], strict=True)]
    return {"max_abs_logp_diff": float(gaps.max()), "mean_abs_logp_diff": float(gaps.mean()), "top1_agreement": sum(same_top) / len(same_top)}


def benchmark_precision(model_name: str, data: str | Path, ks: list[int], n_records: int, repeats: int, rank_records: int,
                        batch_size: int, json_out: str | Path, exact_records: int = 2, sft: bool = True) -> dict[str, Any]:
    """Measure, write `json_out` and return the results (see the module docstring).

    `exact_records` 0 skips packed against naive; `sft` False times the S-DPO steps only.
    """
    domain = read_manifest(data).get("domain", "music")
    train = load_split(data, "train", n_records, seed=0)
    test = load_split(data, "test", rank_records, seed=0)
    trainees = {name: Trainee(model_name, name) for name in VARIANTS}
    tokenizer = trainees["fp32"].tokenizer

    exactness: dict[str, Any] = {"records": exact_records, "negatives": ks if exact_records else []}
    if exact_records:
        chosen = load_split(data, "test", exact_records)  # the records `sdpo benchmark step --records N` takes
        for name, trainee in trainees.items():
            print(f"[benchmark] packed against one sequence per answer in {name}, {exact_records} records", flush=True)
            exactness[name] = {f"K={k}": trainee.packed_against_naive(chosen, domain, k) for k in ks}

    steps = []
    for k in [None, *ks] if sft else ks:
        label = "sft" if k is None else f"s-dpo K={k}"
        print(f"[benchmark] {label} step, {n_records} records", flush=True)
        batch = _packed(tokenizer, train, domain, k)
        references = {name: None if k is None else trainee.reference(batch) for name, trainee in trainees.items()}
        steps.append(_speed_row(label, n_records, _time_steps(trainees, batch, references, repeats)))

    scores, seconds = {}, {}
    for name, trainee in trainees.items():
        print(f"[benchmark] ranking {len(test)} test records in {name}", flush=True)
        scores[name], seconds[name] = trainee.rank(test, domain, batch_size)
    result = {
        "model": model_name,
        "cpu": cpu_name(),
        "cpu_native_bf16": cpu_has_bf16(),
        "cpu_bf16_matmul_speedup": round(cpu_bf16_matmul_speedup(), 2) if cpu_has_bf16() else None,
        "bf16_default": bf16_supported(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "variants": VARIANTS,
        "records_per_step": n_records,
        "repeats": repeats,
        "steps": steps,
        "rank": _speed_row("rank evaluation", len(test), seconds),
        "agreement": {"records": len(test), **{name: _agreement(test, scores, name) for name in LOW_PRECISION_VARIANTS}},
        "packed_against_naive": exactness,
    }
    write_json(json_out, result)
    return result


def _speed_row(label: str, n_records: int, seconds: dict[str, float]) -> dict[str, Any]:
    """Seconds and records/s per precision; each bf16's speedup over fp32, and the fp32 head's over the all-bf16 one (above 1: faster)."""
    row: dict[str, Any] = {"what": label, "records": n_records}
    row.update({f"{name}_seconds": round(seconds[name], 3) for name in VARIANTS})
    row.update({f"{name}_records_per_s": round(n_records / seconds[name], 3) for name in VARIANTS})
    row.update({f"{name}_speedup": round(seconds["fp32"] / seconds[name], 2) for name in LOW_PRECISION_VARIANTS})
    row["fp32_head_speedup"] = round(seconds["bf16_all"] / seconds["bf16"], 2)
    return row


def format_table(result: dict[str, Any]) -> str:
    """The speed table, then each bf16's agreement with fp32, packed against naive, and the CPU."""
    columns = [f"{name} s" for name in VARIANTS] + [f"{name} records/s" for name in VARIANTS]
    columns += [f"{name} speedup" for name in LOW_PRECISION_VARIANTS] + ["fp32-head speedup"]
    keys = [f"{name}_seconds" for name in VARIANTS] + [f"{name}_records_per_s" for name in VARIANTS]
    keys += [f"{name}_speedup" for name in LOW_PRECISION_VARIANTS] + ["fp32_head_speedup"]
    lines = ["| what | records | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in [*result["steps"], result["rank"]]:
        lines.append(f"| {row['what']} | {row['records']} | " + " | ".join(str(row[key]) for key in keys) + " |")
    lines.append("")
    agreement = result["agreement"]
    for name in LOW_PRECISION_VARIANTS:
        against = agreement[name]
        lines.append(f"{name} ({VARIANTS[name]}) against fp32, {agreement['records']} records x all candidates: log-prob |diff| "
                     f"max {against['max_abs_logp_diff']:.3g}, mean {against['mean_abs_logp_diff']:.3g}; "
                     f"top-1 agreement {against['top1_agreement']:.3f}")
    exactness = result["packed_against_naive"]
    if exactness["records"]:
        gaps = "; ".join(f"{name} " + ", ".join(f"{k} {gap:.2g}" for k, gap in exactness[name].items()) for name in VARIANTS)
        lines.append(f"packed against one sequence per answer, max |diff| over {exactness['records']} test records: {gaps}")
    native = "yes" if result["cpu_native_bf16"] else "no"
    if result.get("cpu_bf16_matmul_speedup") is not None:
        native += f", bf16 matmul at {result['cpu_bf16_matmul_speedup']}x fp32"
    lines.append(f"CPU: {result['cpu']} (native bf16: {native}; sdpo's default here: {'bf16' if result['bf16_default'] else 'fp32'})")
    return "\n".join(lines)
