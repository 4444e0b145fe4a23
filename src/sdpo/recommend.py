"""Use a trained LM recommender: rank or answer for one user's history, alone or behind a retriever.

    from sdpo import Recommender
    recommender = Recommender.load("runs/quickstart/s-dpo")
    recommender.rank(["Radiohead", "Portishead"], ["Massive Attack", "Britney Spears", "Muse"])
    # -> [("Massive Attack", -3.1), ("Muse", -4.0), ("Britney Spears", -6.2)]  (title, score), best first

`Recommender.load` reads the run folder's resolved config: the base model, the adapter, and the
prompt settings it was trained with, so its prompts are the training prompts. Ranking scores all
candidates in one packed pass, by log-prob (``logp``) or by reward against the run's reference
(``reward``: the SFT run an align run started from, or the base model for an SFT run).

Deployed recommenders work in two stages: a cheap model retrieves a short list from the whole
catalogue, and the expensive one re-ranks it. `Retriever` loads a trained ``sdpo baseline``
model (SASRec, GRU4Rec, Caser) and returns its top items for a history; the LM re-ranks them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpo.data.records import Record
from sdpo.errors import UserError

SCORES = ("logp", "reward")


def make_record(history: Sequence[str], candidates: Sequence[str], key: str | None = None) -> Record:
    """A record to prompt with (its target is a placeholder: nothing is scored against it); bad input is a user error."""
    history, candidates = list(history), list(candidates)
    where = f"query {key!r}: " if key else ""
    if not history:
        raise UserError(f"{where}the history is empty; give at least one item the user consumed.")
    if not candidates:
        raise UserError(f"{where}no candidates to rank.")
    for title in (*history, *candidates):
        if not isinstance(title, str) or not title.strip() or "\n" in title or "\r" in title:
            raise UserError(f"{where}every title must be a non-empty one-line string, got {title!r}.")
    duplicates = sorted({c for c in candidates if candidates.count(c) > 1})
    if duplicates:
        raise UserError(f"{where}candidate {duplicates[0]!r} is listed twice; give each candidate once.")
    if key is None:
        key = "query-" + hashlib.sha256(json.dumps([history, candidates]).encode()).hexdigest()[:16]
    return Record(key, None, history, candidates, candidates[0])


@dataclass
class Recommender:
    """A causal LM with its LoRA adapter and the prompt settings it was trained with."""

    model: object
    tokenizer: object
    domain: str
    prompt_seed: int = 0
    reference_adapter: str | None = None  # None: the base model (adapter off) is the reward's reference
    prompts: object | None = None  # None: text prompts; a run with collaborative tokens brings its CollaborativePrompts

    @classmethod
    def load(cls, run_dir: str | Path, *, bf16: bool | None = None, device: str | None = None) -> Recommender:
        """Base model + adapter of an ``sdpo sft`` / ``sdpo align`` run folder, with its prompts, on `device`
        (default: the GPU if there is one, else the CPU).

        A run with collaborative tokens loads the collaborative model it recorded (checked by its fingerprint;
        a relative folder is found from the run folder, see `sdpo.training.runs.read_run_config`).
        """
        from sdpo.lm.adapters import check_adapter_folder
        from sdpo.lm.models import evaluation_device, load_model
        from sdpo.lm.precision import model_dtype, resolve_bf16
        from sdpo.training.collaborative import load_collaborative, run_prompts, soft_token_spec
        from sdpo.training.runs import CONFIG_FILE, read_run_config

        run_dir = Path(run_dir)
        if not (run_dir / CONFIG_FILE).is_file():
            raise UserError(f"{run_dir}: not a training run folder (no {CONFIG_FILE}). Give the output folder of sdpo sft or sdpo align.")
        check_adapter_folder(run_dir)
        config = read_run_config(run_dir)
        source = load_collaborative(config)
        device = evaluation_device(device)
        model, tokenizer = load_model(config["model"], run_dir, dtype=model_dtype(resolve_bf16(bf16, device)),
                                      soft_tokens=soft_token_spec(config, source))
        model.to(device)
        reference = str(config["sft"]) if config.get("sft") else None  # an export names its SFT export relative to itself
        seed = int(config.get("prompt_seed") or 0)
        return cls(model, tokenizer, config["domain"], seed, reference, run_prompts(tokenizer, config["domain"], seed, config, source))

    @property
    def collaborative(self):
        """The collaborative model whose vectors the prompts carry (`CollaborativeModel`), or None for a text-only run."""
        return getattr(self.prompts, "model", None)

    def unknown_titles(self, record: Record) -> list[str]:
        """The record's history and candidate titles that the run's collaborative model has no id for (none for a text-only run)."""
        return [] if self.collaborative is None else sorted(self.collaborative.unknown_titles([record]))

    def rank(self, history: Sequence[str], candidates: Sequence[str], score: str = "logp") -> list[tuple[str, float]]:
        """The candidates with their scores, best first (one packed forward pass; two for ``reward``)."""
        return self.rank_records([make_record(history, candidates)], score)[0]

    def rank_records(self, records: list[Record], score: str = "logp", batch_size: int = 8, progress: bool = False) -> list[list[tuple[str, float]]]:
        """`rank` for many records, batched: per record, (title, score) best first."""
        from sdpo.evaluation.metrics import ranked_indices
        from sdpo.evaluation.protocols import candidate_logps, reference_logps

        if score not in SCORES:
            raise UserError(f"--score {score!r}: choose logp or reward.")
        scores = candidate_logps(self.model, self.tokenizer, records, self.domain, batch_size, self.prompt_seed, progress, prompts=self.prompts)
        if score == "reward":
            if self.reference_adapter is not None and not (Path(self.reference_adapter) / "adapter_config.json").is_file():
                raise UserError(f"--score reward: the reference, the SFT run {self.reference_adapter}, is not there; "
                                "rank by logp, or run from the folder the runs were trained in.")
            reference = reference_logps(self.model, self.tokenizer, records, self.domain, batch_size, self.prompt_seed, progress,
                                        self.reference_adapter, prompts=self.prompts)
            scores = [a - b for a, b in zip(scores, reference, strict=True)]
        ranked = []
        for record, row in zip(records, scores, strict=True):
            values = row.tolist()
            ranked.append([(record.candidates[i], values[i]) for i in ranked_indices(values, record.id)])
        return ranked

    def generate(self, history: Sequence[str], candidates: Sequence[str]) -> dict:
        """The paper's protocol for one query: the greedy answer, and the candidate it names (None unless exactly one)."""
        return self.generate_records([make_record(history, candidates)])[0]

    def generate_records(self, records: list[Record], batch_size: int = 8, progress: bool = False) -> list[dict]:
        """`generate` for many records, batched: per record, {"text", "choice"}."""
        from sdpo.evaluation.generation import generate_answers
        from sdpo.evaluation.metrics import longest_match

        texts = generate_answers(self.model, self.tokenizer, records, self.domain, batch_size, self.prompt_seed, progress, prompts=self.prompts)
        answers = []
        for record, text in zip(records, texts, strict=True):
            match = longest_match(text, record.candidates, record.target)
            answers.append({"text": text, "choice": match.matched[0] if match.valid else None})
        return answers


class Retriever:
    """A trained ``sdpo baseline`` model that scores the whole catalogue for a history."""

    def __init__(self, model, items, max_len: int, name: str):
        self.model, self.items, self.max_len, self.name = model.eval(), items, max_len, name

    @classmethod
    def load(cls, folder: str | Path) -> Retriever:
        from sdpo.baselines.collaborative import CollaborativeModel

        source = CollaborativeModel.load(folder, role="retriever")
        return cls(source.model, source.items, source.max_len, source.name)

    def ids(self, titles: Sequence[str], what: str, strict: bool = True) -> list[int]:
        """Catalogue ids of titles; an unknown title is refused, or kept as the UNKNOWN id when not `strict`.

        Histories are not strict: the baselines' own evaluation reads unseen history items the same way.
        """
        from sdpo.baselines.items import UNKNOWN

        ids = [self.items.id_of(t) for t in titles]
        if not strict:
            return ids
        unknown = [t for t, i in zip(titles, ids, strict=True) if i == UNKNOWN]
        if unknown:
            raise UserError(f"{what} item {unknown[0]!r} is not in the retriever's catalogue ({len(self.items) - 2} items "
                            "from its training records).")
        return ids

    @torch.no_grad()
    def top(self, histories: Sequence[Sequence[str]], n: int = 20, pools: Sequence[Sequence[str] | None] | None = None) -> list[list[tuple[str, float]]]:
        """Per history, the n best items outside the history, with the retriever's scores, best first.

        Items come from the whole catalogue, or from the history's pool when `pools` gives one
        (every pool title must be in the catalogue).
        """
        from sdpo.baselines.items import PAD, UNKNOWN

        if n < 1 or n > len(self.items) - 2:
            raise UserError(f"--top must be between 1 and {len(self.items) - 2}, got {n}.")
        pools = pools or [None] * len(histories)
        rows = []
        for history in histories:
            ids = self.ids(history, "history", strict=False)[-self.max_len :]
            rows.append([PAD] * (self.max_len - len(ids)) + ids)
        states = self.model(torch.tensor(rows))  # [B, D]
        scores = self.model.logits(states)  # [B, n_items]
        scores[:, [PAD, UNKNOWN]] = float("-inf")
        result = []
        for row, history, pool in zip(scores, histories, pools, strict=True):
            if pool is not None:
                allowed = torch.zeros_like(row, dtype=torch.bool)
                allowed[self.ids(pool, "candidate")] = True
                row[~allowed] = float("-inf")
            row[self.ids(history, "history", strict=False)] = float("-inf")
            values, indices = torch.topk(row, min(n, int(torch.isfinite(row).sum())))
            result.append([(self.items.titles[i - 2], float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)])
        return result


def _rank_metrics(rank: int | None) -> dict[str, float]:
    """HR@1, NDCG@10 and MRR of one record, from the target's rank in a short list (None: not in it, all 0)."""
    import math

    from sdpo.evaluation.metrics import per_record_ranking

    values = per_record_ranking([math.inf if rank is None else rank])
    return {key: values[key][0] for key in ("hr@1", "ndcg@10", "mrr")}


def evaluate_rerank(recommender: Recommender, retriever: Retriever, records: list[Record], top: int = 20, score: str = "logp",
                    batch_size: int = 8, progress: bool = True):
    """Two-stage evaluation: the retriever's top items from the whole catalogue, re-ranked by the LM.

    Per record: ``recall@N`` (is the target among the retrieved), and HR@1, NDCG@10, MRR of the
    target in the retriever's own order and in the LM's order (0 when the target was not
    retrieved). The LM's gain over the retriever is a paired difference on the same records.
    Returns an `Evaluation` (metrics with 95% intervals; one prediction per record).
    """
    from sdpo.evaluation.results import Evaluation
    from sdpo.evaluation.stats import bootstrap_cis, paired_difference

    retrieved = retriever.top([r.history for r in records], top)
    queries = [Record(r.id, r.user, r.history, [t for t, _ in items], r.target) for r, items in zip(records, retrieved, strict=True)]
    reranked = recommender.rank_records(queries, score, batch_size, progress)
    columns: dict[str, list[float]] = {}
    predictions = []
    for record, items, ranking in zip(records, retrieved, reranked, strict=True):
        titles = [t for t, _ in items]
        retriever_rank = titles.index(record.target) + 1 if record.target in titles else None
        lm_titles = [t for t, _ in ranking]
        lm_rank = lm_titles.index(record.target) + 1 if record.target in lm_titles else None
        values = {f"recall@{top}": float(retriever_rank is not None)}
        values.update({f"retriever_{k}": v for k, v in _rank_metrics(retriever_rank).items()})
        values.update(_rank_metrics(lm_rank))
        for key, value in values.items():
            columns.setdefault(key, []).append(value)
        predictions.append({"id": record.id, "target": record.target, "retrieved": titles, "reranked": lm_titles,
                            "retriever_rank": retriever_rank, "rank": lm_rank})
    metrics: dict = {key: sum(v) / len(v) for key, v in columns.items()}
    metrics["ci95"] = bootstrap_cis(columns)
    metrics["lm_minus_retriever"] = {k: paired_difference(columns[k], columns[f"retriever_{k}"]) for k in ("hr@1", "ndcg@10")}
    metrics.update({"retriever": retriever.name, "top": top, "score": score})
    return Evaluation(metrics, predictions)
