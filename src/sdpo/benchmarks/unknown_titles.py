"""Benchmark what the learned unknown vector is worth: rank records whose histories hold titles the collaborative model never saw.

A collaborative run (``--collaborative DIR``) gives every title its collaborative model's vector; a
title without an id there reads the projectors' learned unknown vector instead (`sdpo.lm.soft_tokens`).
Here a share of each record's history titles is replaced by made-up titles that no catalogue holds
(``Unseen title 17``; the draw is seeded), and the records are ranked twice by the same run, in one
process: with its learned unknown vectors, and with them set to zeros (what they were before training).
Reported: HR@1 of each with its 95% interval, and their paired difference.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.evaluation.metrics import target_ranks
from sdpo.evaluation.stats import bootstrap_ci, paired_difference
from sdpo.lm.soft_tokens import CollaborativeTokens

UNSEEN = "Unseen title {number}"


def with_unseen_history(records: list[Record], share: float, seed: int = 0) -> tuple[list[Record], int]:
    """`records` with round(share x history length) history titles each replaced by a made-up one; and how many were replaced.

    Which positions are replaced, and the numbers in the made-up titles, are drawn with `seed`.
    """
    rng = random.Random(seed)
    changed, replaced = [], 0
    for record in records:
        history = list(record.history)
        for position in rng.sample(range(len(history)), round(share * len(history))):
            history[position] = UNSEEN.format(number=rng.randrange(10**6))
            replaced += 1
        changed.append(Record(record.id, record.user, history, record.candidates, record.target))
    return changed, replaced


def _unknown_vectors(model) -> list[torch.nn.Parameter]:
    return [module.unknown for tokens in model.modules() if isinstance(tokens, CollaborativeTokens)
            for module in (tokens.items, tokens.user)]


WAYS = ("learned", "zeros")


def _active_norms(model) -> dict[str, float]:
    """The norms of the unknown vectors the run ranks with: its adapter's copy of the projectors, not the base model's."""
    from sdpo.lm.soft_tokens import collaborative_tokens_of

    tokens = collaborative_tokens_of(model)
    return {name: round(float(getattr(tokens, name).unknown.norm()), 4) for name in ("items", "user")}


def benchmark_unknown_titles(run: str | Path, data: str | Path, split: str = "val", limit: int = 500, share: float = 0.2,
                             seed: int = 0, batch_size: int = 8, ways: tuple[str, ...] = WAYS) -> dict[str, Any]:
    """HR@1 of `run` on `limit` records of `split` (drawn with `seed`) with `share` of their history titles unseen,
    with the learned unknown vectors and with zeros (`ways`: one of them alone skips the other's pass); and their paired difference."""
    from sdpo.data.datasets import load_split
    from sdpo.evaluation.protocols import candidate_logps
    from sdpo.lm.adapters import check_adapter_folder
    from sdpo.lm.models import load_model
    from sdpo.lm.precision import cpu_name
    from sdpo.training.collaborative import load_collaborative, run_prompts, soft_token_spec
    from sdpo.training.runs import read_run_config

    check_adapter_folder(run)
    config = read_run_config(run)
    source = load_collaborative(config)
    if source is None:
        raise UserError(f"{run}: a text-only run; the unknown vector belongs to collaborative tokens (sdpo sft --collaborative DIR).")
    model, tokenizer = load_model(config["model"], run, soft_tokens=soft_token_spec(config, source))  # fp32, on the CPU
    domain, prompt_seed = config["domain"], int(config.get("prompt_seed") or 0)
    prompts = run_prompts(tokenizer, domain, prompt_seed, config, source)
    records, replaced = with_unseen_history(load_split(data, split, limit, seed), share, seed)
    vectors = _unknown_vectors(model)
    learned = [v.detach().clone() for v in vectors]
    norms = _active_norms(model)
    hits: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for way in ways:
        with torch.no_grad():
            for vector, value in zip(vectors, learned, strict=True):
                vector.copy_(value if way == "learned" else torch.zeros_like(value))
        start = time.perf_counter()
        scores = candidate_logps(model, tokenizer, records, domain, batch_size, prompt_seed, progress=False, prompts=prompts)
        seconds[way] = round(time.perf_counter() - start, 1)
        hits[way] = [float(rank == 1) for rank in target_ranks(records, scores)]
        print(f"[benchmark] {way}: HR@1 {sum(hits[way]) / len(records):.4f} ({seconds[way]} s)", flush=True)
    unknown = source.unknown_titles(records)
    return {
        "run": str(run), "data": str(data), "split": split, "records": len(records), "subset_seed": seed, "share": share,
        "replaced_titles": replaced, "unknown_occurrences": sum(unknown.values()),
        "unknown_vector_norm": norms,
        "hr@1": {way: sum(values) / len(values) for way, values in hits.items()},
        "ci95": {way: bootstrap_ci(values) for way, values in hits.items()},
        "hits": {way: [int(hit) for hit in values] for way, values in hits.items()},  # per record, in `record_ids` order
        "record_ids": [r.id for r in records],
        **({"learned_minus_zeros": paired_difference(hits["learned"], hits["zeros"])} if set(WAYS) <= hits.keys() else {}),
        "seconds": seconds, "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = ["| unknown vector | HR@1 | 95% interval |", "|---|---|---|"]
    for way in result["hr@1"]:
        low, high = result["ci95"][way]
        lines.append(f"| {way} | {result['hr@1'][way]:.4f} | [{low:.3f}, {high:.3f}] |")
    if "learned_minus_zeros" not in result:
        return "\n".join(lines)
    difference = result["learned_minus_zeros"]
    low, high = difference["interval"]
    lines.append(f"\nlearned - zeros: {difference['difference']:+.4f} [{low:+.3f}, {high:+.3f}] (paired, {result['records']} records, "
                 f"{result['replaced_titles']} history titles unseen)")
    return "\n".join(lines)
