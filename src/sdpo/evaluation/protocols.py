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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from sdpo.data.prompts import TextPrompts, encode_answer
from sdpo.data.records import Record
from sdpo.evaluation.generation import generate_answers, score_generations
from sdpo.evaluation.journal import JOURNAL_FILE, Journal, batches, journaled
from sdpo.evaluation.metrics import per_record_ranking, ranked_indices, ranking_metrics
from sdpo.evaluation.results import PREDICTIONS, Evaluation, predictions_file
from sdpo.evaluation.stats import bootstrap_cis
from sdpo.lm.decoder import causal_lm_parts
from sdpo.lm.head import low_precision_linear
from sdpo.lm.scoring import score_answers

if TYPE_CHECKING:
    from sdpo.lm.trunk import TrunkCache

# what callers imported from here before generation.py and results.py were split off
__all__ = ["PREDICTIONS", "PROTOCOLS", "SCORES", "Evaluation", "candidate_logps", "evaluate", "generate_answers", "predictions_file",
           "rank_candidates", "reference_logps", "score_generations", "score_rankings"]

PROTOCOLS = ("generate", "rank")
SCORES = ("logp", "reward")
REFERENCE_ADAPTER = "reference"


@torch.no_grad()
def candidate_logps(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0, progress: bool = True,
                    journal: Journal | None = None, kind: str = "logp", *, trunk: TrunkCache | None = None,
                    prompts=None) -> list[torch.Tensor]:
    """Per record, log pi(candidate | prompt) of each candidate in candidate order: a [C] tensor.

    With a `journal`, batches it holds (as `kind`) are read from it and new ones are added to it.
    With a `trunk` cache, the layers no adapter changes run once per batch across evaluations.
    `prompts` builds the prompts (default: `TextPrompts`; `sdpo.baselines.prompts.CollaborativePrompts`
    adds collaborative tokens, which the model's projectors read).
    """
    prompts = prompts or TextPrompts(tokenizer, domain, seed)
    model.eval()
    scores = []
    for batch in tqdm(list(batches(records, batch_size)), desc="score candidates", disable=not progress):
        done = journaled(journal, kind, batch)
        if done is not None:
            scores.extend(torch.tensor(values, dtype=torch.float32) for values in done)
            continue
        prompt_ids = [prompts.ids(r) for r in batch]
        answers = [[encode_answer(tokenizer, c) for c in r.candidates] for r in batch]
        soft_inputs = prompts.soft_inputs(batch, prompt_ids)
        rows = score_answers(model, prompt_ids, answers, tokenizer.pad_token_id, trunk, soft_inputs=soft_inputs).float().cpu()
        new = [row[: len(record.candidates)] for record, row in zip(batch, rows, strict=True)]
        if journal is not None:
            journal.add(kind, [(record.id, row.tolist()) for record, row in zip(batch, new, strict=True)])
        scores.extend(new)
    return scores


@torch.no_grad()
def reference_logps(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0,
                    progress: bool = True, reference_adapter: str | Path | None = None, journal: Journal | None = None,
                    *, trunk: TrunkCache | None = None, prompts=None) -> list[torch.Tensor]:
    """`candidate_logps` under the reference of a PEFT model: its base (adapter off) or `reference_adapter`.

    With collaborative tokens, the reference's projectors are its own: the initial ones with the
    adapter off, the reference adapter's copy otherwise.
    """
    score = partial(candidate_logps, model, tokenizer, records, domain, batch_size, seed, progress, journal, "reference",
                    trunk=trunk, prompts=prompts)
    if journal is not None and journaled(journal, "reference", records) is not None:
        return score()
    if reference_adapter is None:
        with model.disable_adapter():
            return score()
    from sdpo.lm.quiet import quiet_peft

    with quiet_peft():
        model.load_adapter(str(reference_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    active = model.active_adapter
    model.set_adapter(REFERENCE_ADAPTER)
    try:
        return score()
    finally:
        model.set_adapter(active)
        model.delete_adapter(REFERENCE_ADAPTER)


def rank_candidates(model, tokenizer, records: list[Record], domain: str, batch_size: int = 8, seed: int = 0, progress: bool = True,
                    prompts=None):
    """Per record, its candidates with log-probs, best first (seeded tie order): list of [(title, logp), ...]."""
    ranked = []
    scores_of = candidate_logps(model, tokenizer, records, domain, batch_size, seed, progress, prompts=prompts)
    for record, row in zip(records, scores_of, strict=True):
        scores = row.tolist()
        ranked.append([(record.candidates[i], scores[i]) for i in ranked_indices(scores, record.id)])
    return ranked


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
    prompts=None,
) -> Evaluation:
    """Run one protocol on `records`; metrics carry n_records, protocol, seconds and `info`.

    For the rank protocol, `reference` adds the reward ranking: True scores the candidates
    with the model's base (adapter off), a folder with that reference adapter, and a list
    of per-record scores is used as it is (e.g. the previous stage's log-probs). With
    `journal_dir`, raw outputs go to its journal as they come, and an interrupted evaluation
    with the same `info` continues from there (see `sdpo.evaluation.journal`). A `trunk` cache serves
    both protocols (see `sdpo.lm.trunk`). `prompts`: as in `candidate_logps` (default: text prompts).
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
        if low_precision_linear(causal_lm_parts(model)[1]) is not None:  # a bf16 model's fp32 head: not the all-bf16 journals
            settings["lm_head"] = "fp32"
        journal = Journal(Path(journal_dir) / JOURNAL_FILE, settings)
        if len(journal):
            print(f"[evaluate] continuing: {len(journal)} outputs already in {journal.path}")
    if protocol == "rank":
        logps = candidate_logps(model, tokenizer, records, domain, batch_size, seed, progress, journal, trunk=trunk, prompts=prompts)
        if reference is True:
            reference = reference_logps(model, tokenizer, records, domain, batch_size, seed, progress, journal=journal, trunk=trunk,
                                        prompts=prompts)
        elif isinstance(reference, (str, Path)):
            reference = reference_logps(model, tokenizer, records, domain, batch_size, seed, progress, reference, journal, trunk=trunk,
                                        prompts=prompts)
        result = score_rankings(records, logps, reference or None, score)
    else:
        texts = generate_answers(model, tokenizer, records, domain, batch_size, seed, progress, journal, trunk=trunk, prompts=prompts)
        result = score_generations(records, texts)
    result.metrics = {
        **result.metrics,
        "n_records": len(records),
        "protocol": protocol,
        "seconds": round(time.perf_counter() - start, 2),
        **(info or {}),
    }
    return result
