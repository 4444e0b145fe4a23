"""Benchmark what collaborative tokens cost a training step: the same step on text prompts and on collaborative ones.

Both steps run on one model (LoRA, and the projectors for the collaborative prompts), the same
records and the same answers, in one process, the two ways alternating (`repeats` each, medians
reported). A step is what a training step does per batch: build the prompts (and, for the
collaborative ones, the frozen collaborative model's vectors and scores), pack them, run the
policy forward and backward with the loss (SFT: NLL of the target; S-DPO: K negatives against a
precomputed reference table, here zeros). The issue's bar: at most 1.5x the text-only step.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from sdpo.baselines.collaborative import CollaborativeModel
from sdpo.baselines.prompts import CollaborativePrompts
from sdpo.benchmarks.step import step_answers
from sdpo.data.prompts import TextPrompts
from sdpo.data.records import Record
from sdpo.lm.models import LoraSettings, add_lora, load_model
from sdpo.lm.precision import model_dtype
from sdpo.lm.scoring import answer_logprobs, pack_answers
from sdpo.lm.soft_tokens import SoftTokenSpec
from sdpo.training.losses import softmax_dpo_loss


def benchmark_collaborative(model_name: str, records: list[Record], domain: str, collaborative: str, ks: list[int], repeats: int = 5,
                            bf16: bool = False, lora_layers: int | None = None, score: bool = True) -> list[dict[str, Any]]:
    """Seconds per step on text and on collaborative prompts, for SFT (K = 0) and S-DPO with each K; a result per step kind."""
    source = CollaborativeModel.load(collaborative)
    base, tokenizer = load_model(model_name, dtype=model_dtype(bf16), soft_tokens=SoftTokenSpec(source.dim, score))
    policy = add_lora(base, LoraSettings(dropout=0.0, last_layers=lora_layers)).train()
    ways = {"text": TextPrompts(tokenizer, domain), "collaborative": CollaborativePrompts(tokenizer, domain, 0, source, score=score)}
    results = []
    for k in [0, *ks]:
        answers = step_answers(tokenizer, records, k)

        def step(prompts, answers=answers, k=k) -> int:
            policy.zero_grad(set_to_none=True)
            ids = [prompts.ids(r) for r in records]
            packed = {**pack_answers(ids, answers, tokenizer.pad_token_id), **prompts.soft_inputs(records, ids)}
            logps, n_tokens = answer_logprobs(policy, packed)
            if k == 0:
                loss = -logps.sum() / n_tokens.sum()
            else:
                reference = torch.zeros_like(logps)
                loss = softmax_dpo_loss(logps[:, 0], logps[:, 1:], reference[:, 0], reference[:, 1:], 1.0).mean()
            loss.backward()
            return int(packed["input_ids"].numel())

        seconds: dict[str, list[float]] = {way: [] for way in ways}
        tokens = {way: step(prompts) for way, prompts in ways.items()}  # warm-up
        for _ in range(repeats):
            for way, prompts in ways.items():
                start = time.perf_counter()
                step(prompts)
                seconds[way].append(time.perf_counter() - start)
        text, collab = statistics.median(seconds["text"]), statistics.median(seconds["collaborative"])
        results.append({"step": "sft" if k == 0 else f"s-dpo K={k}", "records": len(records), "lora_layers": lora_layers,
                         "text_seconds": round(text, 4), "collaborative_seconds": round(collab, 4), "ratio": round(collab / text, 3),
                         "text_tokens": tokens["text"], "collaborative_tokens": tokens["collaborative"]})
        print(f"[benchmark] {results[-1]}", flush=True)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    keys = ["step", "records", "lora_layers", "text_seconds", "collaborative_seconds", "ratio", "text_tokens", "collaborative_tokens"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in results]
    return "\n".join(lines)
