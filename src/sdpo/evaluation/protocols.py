"""Evaluate an LM recommender on prepared records, two ways.

- ``generate`` (the paper's protocol): greedy decoding of at most 20 new tokens; only the
  new tokens are decoded. HitRatio@1 and ValidRatio by the paper's substring rule, and
  beside them by the stricter longest-match rule (``strict_hr@1``, ``strict_valid_ratio``).
- ``rank``: every candidate scored behind its prompt in one packed pass; HR@1/5, NDCG@5/10
  and MRR (ValidRatio is 1), by two scores:

  * ``logp``: log pi(c | x), the summed log-prob of the title. It carries the base LM's
    prior over title strings: long or rare names are penalised whatever the history says.
  * ``reward``: log pi(c | x) - log pi_ref(c | x), the implicit reward that DPO and S-DPO
    optimise. The reference is the base model (for an SFT adapter) or the SFT adapter (for
    an S-DPO/DPO one), so the prior cancels and what remains is what training changed.

  Metrics by logp keep their plain names (``hr@1``); by reward they are prefixed
  (``reward_hr@1``). Every metric comes with its 95% bootstrap interval (``ci95``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from sdpo.data.prompts import encode_answer, record_prompt_ids
from sdpo.data.records import Record
from sdpo.evaluation.journal import JOURNAL_FILE, Journal
from sdpo.evaluation.metrics import longest_match, paper_match, per_record_ranking, ranked_indices, ranking_metrics
from sdpo.evaluation.stats import bootstrap_cis
from sdpo.io import write_json, write_jsonl
from sdpo.lm.precision import compute_context
from sdpo.lm.scoring import score_answers

if TYPE_CHECKING:
    from sdpo.lm.trunk import TrunkCache

PROTOCOLS = ("generate", "rank")
SCORES = ("logp", "reward")
MAX_NEW_TOKENS = 20
REFERENCE_ADAPTER = "reference"
PREDICTIONS = "predictions.jsonl"


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]

    def save(self, out_dir: str | Path, compress: bool = False) -> None:
        """predictions.jsonl (predictions.jsonl.gz with `compress`), then metrics.json: metrics.json means both are whole."""
        out_dir = Path(out_dir)
        written, other = (PREDICTIONS + ".gz", PREDICTIONS) if compress else (PREDICTIONS, PREDICTIONS + ".gz")
        write_jsonl(out_dir / written, self.predictions)
        (out_dir / other).unlink(missing_ok=True)  # an earlier evaluation's, in the other form: never read in place of these
        write_json(out_dir / "metrics.json", self.metrics)
        (out_dir / JOURNAL_FILE).unlink(missing_ok=True)  # the raw outputs it held are in the files above


def predictions_file(out_dir: str | Path) -> Path:
    """The per-record predictions an evaluation wrote into `out_dir`: predictions.jsonl.gz, else predictions.jsonl."""
    compressed = Path(out_dir) / (PREDICTIONS + ".gz")
    return compressed if compressed.is_file() else Path(out_dir) / PREDICTIONS


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def _journaled(journal: Journal | None, kind: str, batch: list[Record]) -> list[Any] | None:
    """The batch's outputs of `kind` from the journal, if it holds all of them."""
    if journal is None:
        return None
    found = [journal.get(kind, r.id) for r in batch]
    return None if any(value is None for value in found) else found


@torch.no_grad()
def candidate_logps(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0, progress: bool = True,
                    journal: Journal | None = None, kind: str = "logp", *, trunk: TrunkCache | None = None) -> list[torch.Tensor]:
    """Per record, log pi(candidate | prompt) of each candidate in candidate order: a [C] tensor.

    With a `journal`, batches it holds (as `kind`) are read from it and new ones are added to it.
    With a `trunk` cache, the layers no adapter changes run once per batch across evaluations.
    """
    model.eval()
    scores = []
    for batch in tqdm(list(_batches(records, batch_size)), desc="score candidates", disable=not progress):
        done = _journaled(journal, kind, batch)
        if done is not None:
            scores.extend(torch.tensor(values, dtype=torch.float32) for values in done)
            continue
        prompts = [record_prompt_ids(tokenizer, r, domain, seed) for r in batch]
        answers = [[encode_answer(tokenizer, c) for c in r.candidates] for r in batch]
        rows = score_answers(model, prompts, answers, tokenizer.pad_token_id, trunk).float().cpu()
        new = [row[: len(record.candidates)] for record, row in zip(batch, rows, strict=True)]
        if journal is not None:
            journal.add(kind, [(record.id, row.tolist()) for record, row in zip(batch, new, strict=True)])
        scores.extend(new)
    return scores


@torch.no_grad()
def reference_logps(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0,
                    progress: bool = True, reference_adapter: str | Path | None = None, journal: Journal | None = None,
                    *, trunk: TrunkCache | None = None) -> list[torch.Tensor]:
    """`candidate_logps` under the reference of a PEFT model: its base (adapter off) or `reference_adapter`."""
    score = partial(candidate_logps, model, tokenizer, records, domain, batch_size, seed, progress, journal, "reference", trunk=trunk)
    if journal is not None and _journaled(journal, "reference", records) is not None:
        return score()
    if reference_adapter is None:
        with model.disable_adapter():
            return score()
    from sdpo.lm.models import quiet_peft

    with quiet_peft():
        model.load_adapter(str(reference_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    active = model.active_adapter
    model.set_adapter(REFERENCE_ADAPTER)
    try:
        return score()
    finally:
        model.set_adapter(active)
        model.delete_adapter(REFERENCE_ADAPTER)


def rank_candidates(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0, progress: bool = True):
    """Per record, its candidates with log-probs, best first (seeded tie order): list of [(title, logp), ...]."""
    ranked = []
    for record, row in zip(records, candidate_logps(model, tokenizer, records, domain, batch_size, seed, progress), strict=True):
        scores = row.tolist()
        ranked.append([(record.candidates[i], scores[i]) for i in ranked_indices(scores, record.id)])
    return ranked


@torch.no_grad()
def generate_answers(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0, progress: bool = True,
                     journal: Journal | None = None, *, trunk: TrunkCache | None = None) -> list[str]:
    """Greedy answers (at most 20 new tokens), decoded from the new tokens only (journaled as in `candidate_logps`).

    With a `trunk` cache, the prompt's pass through the layers no adapter changes runs once per batch across evaluations.
    """
    model.eval()
    device = next(model.parameters()).device
    texts = []
    for batch in tqdm(list(_batches(records, batch_size)), desc="generate", disable=not progress):
        done = _journaled(journal, "text", batch)
        if done is not None:
            texts.extend(done)
            continue
        prompts = [record_prompt_ids(tokenizer, r, domain, seed) for r in batch]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        options = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": MAX_NEW_TOKENS, "do_sample": False,
                   "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        with compute_context(_weight(model)):
            output = trunk.generate(model, **options) if trunk is not None else model.generate(**options)
        new = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        if journal is not None:
            journal.add("text", [(record.id, text) for record, text in zip(batch, new, strict=True)])
        texts.extend(new)
    return texts


def score_generations(records: list[Record], texts: list[str]) -> Evaluation:
    """Paper and longest-match metrics for generated answers, with their bootstrap intervals."""
    predictions, columns = [], {"hr@1": [], "valid_ratio": [], "strict_hr@1": [], "strict_valid_ratio": []}
    for record, text in zip(records, texts, strict=True):
        paper = paper_match(text, record.candidates, record.target)
        strict = longest_match(text, record.candidates, record.target)
        flags = {"hit": paper.hit, "valid": paper.valid, "strict_hit": strict.hit, "strict_valid": strict.valid}
        for column, flag in zip(columns, flags.values(), strict=True):
            columns[column].append(float(flag))
        predictions.append({"id": record.id, "target": record.target, "generated": text, "matched": list(paper.matched), **flags})
    metrics: dict[str, Any] = {name: sum(values) / len(values) for name, values in columns.items()}
    metrics["ci95"] = bootstrap_cis(columns)
    return Evaluation(metrics, predictions)


def score_rankings(records: list[Record], logps: Sequence[Sequence[float]], reference: Sequence[Sequence[float]] | None = None,
                   score: str = "logp", label: str = "logp") -> Evaluation:
    """Ranking metrics (by logp, and by reward when `reference` is given) and per-record predictions.

    logps, reference: per record, a score per candidate in candidate order. `score` picks the
    ranking each prediction lists (``ranking``, ``rank``, ``hit``); both ranks are kept
    (``logp_rank``, ``reward_rank``). `label` names the first score in the output (the
    classic baselines' scores are not log-probs).
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose logp or reward")
    if score == "reward" and reference is None:
        raise ValueError("ranking by reward needs the reference's log-probs")
    by_score: dict[str, list[list[float]]] = {"logp": [[float(x) for x in row] for row in logps]}
    if reference is not None:
        by_score["reward"] = [[p - float(r) for p, r in zip(row, ref, strict=True)] for row, ref in zip(by_score["logp"], reference, strict=True)]
    orders = {name: [ranked_indices(rows[i], r.id) for i, r in enumerate(records)] for name, rows in by_score.items()}
    ranks = {name: [order.index(r.candidates.index(r.target)) + 1 for r, order in zip(records, rows, strict=True)] for name, rows in orders.items()}
    metrics: dict[str, Any] = {"score": label if score == "logp" else score}
    intervals: dict[str, list[float]] = {}
    for name, name_ranks in ranks.items():
        prefix = "" if name == "logp" else f"{name}_"
        metrics.update({prefix + k: v for k, v in ranking_metrics(name_ranks).items() if prefix == "" or k != "valid_ratio"})
        intervals.update({prefix + k: v for k, v in bootstrap_cis(per_record_ranking(name_ranks)).items()})
    metrics["ci95"] = intervals
    predictions = []
    for i, record in enumerate(records):
        ranking = []
        for c in orders[score][i]:
            entry = {"title": record.candidates[c], label: by_score["logp"][i][c]}
            if reference is not None:
                entry["reward"] = by_score["reward"][i][c]
            ranking.append(entry)
        rank = ranks[score][i]
        row = {"id": record.id, "target": record.target, "rank": rank, "hit": rank == 1, "valid": True}
        if reference is not None:
            row.update({f"{name}_rank": name_ranks[i] for name, name_ranks in ranks.items()})
        predictions.append({**row, "ranking": ranking})
    return Evaluation(metrics, predictions)


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
    *,
    score: str = "logp",
    reference: Sequence[Sequence[float]] | str | Path | bool | None = None,
    journal_dir: str | Path | None = None,
    trunk: TrunkCache | None = None,
) -> Evaluation:
    """Run one protocol on `records`; metrics carry n_records, protocol, seconds and `info`.

    For the rank protocol, `reference` adds the reward ranking: True scores the candidates
    with the model's base (adapter off), a folder with that reference adapter, and a list
    of per-record scores is used as it is (e.g. the previous stage's log-probs). With
    `journal_dir`, raw outputs go to its journal as they come, and an interrupted evaluation
    with the same `info` continues from there (see `sdpo.evaluation.journal`). A `trunk` cache serves
    both protocols (see `sdpo.lm.trunk`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    start = time.perf_counter()
    journal = None
    if journal_dir is not None:
        if not info or "adapter_sha256" not in info:
            raise ValueError("a journaled evaluation needs `info` naming the model and the adapter's hash (see evaluate_model)")
        settings = {"protocol": protocol, "domain": domain, "prompt_seed": seed, "batch_size": batch_size,
                    "records": [r.id for r in records], **info}
        journal = Journal(Path(journal_dir) / JOURNAL_FILE, settings)
        if len(journal):
            print(f"[evaluate] continuing: {len(journal)} outputs already in {journal.path}")
    if protocol == "rank":
        logps = candidate_logps(model, tokenizer, records, domain, batch_size, seed, progress, journal, trunk=trunk)
        if reference is True:
            reference = reference_logps(model, tokenizer, records, domain, batch_size, seed, progress, journal=journal, trunk=trunk)
        elif isinstance(reference, (str, Path)):
            reference = reference_logps(model, tokenizer, records, domain, batch_size, seed, progress, reference, journal, trunk=trunk)
        result = score_rankings(records, logps, reference or None, score)
    else:
        texts = generate_answers(model, tokenizer, records, domain, batch_size, seed, progress, journal, trunk=trunk)
        result = score_generations(records, texts)
    result.metrics = {
        **result.metrics,
        "n_records": len(records),
        "protocol": protocol,
        "seconds": round(time.perf_counter() - start, 2),
        **(info or {}),
    }
    return result
