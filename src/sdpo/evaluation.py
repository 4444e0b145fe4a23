"""Evaluate an LM recommender on prepared records, two ways.

- ``generate`` (the paper's protocol): greedy decoding of at most 20 new tokens; only the
  new tokens are decoded. HitRatio@1 and ValidRatio by the paper's substring rule, and
  beside them by the stricter longest-match rule (``strict_hr@1``, ``strict_valid_ratio``).
- ``rank``: every candidate scored by `score_answers` behind its prompt in one pass; the
  candidates sorted by log-prob give HR@1/5, NDCG@5/10 and MRR (ValidRatio is 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sdpo.io import write_json, write_jsonl
from sdpo.metrics import longest_match, paper_match, rank_of, ranking_metrics
from sdpo.prompts import encode_answer, record_prompt_ids
from sdpo.records import Record
from sdpo.scoring import score_answers

PROTOCOLS = ("generate", "rank")
MAX_NEW_TOKENS = 20


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]

    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        write_jsonl(out_dir / "predictions.jsonl", self.predictions)
        write_json(out_dir / "metrics.json", self.metrics)


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def candidate_logps(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[torch.Tensor]:
    """Per record, log pi(candidate | prompt) of each candidate in candidate order: a [C] tensor."""
    model.eval()
    scores = []
    for batch in tqdm(list(_batches(records, batch_size)), desc="score candidates", disable=not progress):
        prompts = [record_prompt_ids(tokenizer, r, domain, seed) for r in batch]
        answers = [[encode_answer(tokenizer, c) for c in r.candidates] for r in batch]
        rows = score_answers(model, prompts, answers, tokenizer.pad_token_id).float().cpu()
        scores.extend(row[: len(record.candidates)] for record, row in zip(batch, rows))
    return scores


def rank_candidates(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0, progress: bool = True):
    """Per record, its candidates with log-probs, best first: list of [(title, logp), ...]."""
    ranked = []
    for record, row in zip(records, candidate_logps(model, tokenizer, records, domain, batch_size, seed, progress)):
        pairs = [(title, float(row[i])) for i, title in enumerate(record.candidates)]
        ranked.append(sorted(pairs, key=lambda pair: -pair[1]))  # stable: ties keep candidate order
    return ranked


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[str]:
    """Greedy answers (at most 20 new tokens), decoded from the new tokens only."""
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for batch in tqdm(list(_batches(records, batch_size)), desc="generate", disable=not progress):
        prompts = [record_prompt_ids(tokenizer, r, domain, seed) for r in batch]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    return texts


def score_generations(records: list[Record], texts: list[str]) -> Evaluation:
    """Paper and longest-match metrics for generated answers."""
    predictions, counts = [], {"hit": 0, "valid": 0, "strict_hit": 0, "strict_valid": 0}
    for record, text in zip(records, texts, strict=True):
        paper = paper_match(text, record.candidates, record.target)
        strict = longest_match(text, record.candidates, record.target)
        flags = {"hit": paper.hit, "valid": paper.valid, "strict_hit": strict.hit, "strict_valid": strict.valid}
        for key, value in flags.items():
            counts[key] += value
        predictions.append({"id": record.id, "target": record.target, "generated": text, "matched": list(paper.matched), **flags})
    n = len(records)
    metrics = {
        "hr@1": counts["hit"] / n,
        "valid_ratio": counts["valid"] / n,
        "strict_hr@1": counts["strict_hit"] / n,
        "strict_valid_ratio": counts["strict_valid"] / n,
    }
    return Evaluation(metrics, predictions)


def score_rankings(records: list[Record], rankings: list[list[tuple[str, float]]]) -> Evaluation:
    """Ranking metrics and per-record predictions from ranked (title, score) lists."""
    predictions, ranks = [], []
    for record, ranking in zip(records, rankings, strict=True):
        rank = rank_of(record.target, [title for title, _ in ranking])
        ranks.append(rank)
        predictions.append(
            {
                "id": record.id,
                "target": record.target,
                "ranking": [{"title": t, "score": s} for t, s in ranking],
                "rank": rank,
                "hit": rank == 1,
                "valid": True,
            }
        )
    return Evaluation(ranking_metrics(ranks), predictions)


def evaluate(
    model,
    tokenizer,
    records: list[Record],
    domain: str,
    protocol: str,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    info: dict[str, Any] | None = None,
) -> Evaluation:
    """Run one protocol on `records`; metrics carry n_records, protocol, seconds and `info`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    start = time.perf_counter()
    if protocol == "rank":
        result = score_rankings(records, rank_candidates(model, tokenizer, records, domain, batch_size, seed, progress))
    else:
        result = score_generations(records, generate_answers(model, tokenizer, records, domain, batch_size, seed, progress))
    result.metrics = {
        **result.metrics,
        "n_records": len(records),
        "protocol": protocol,
        "seconds": round(time.perf_counter() - start, 2),
        **(info or {}),
    }
    return result
