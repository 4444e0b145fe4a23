"""Train and evaluate a classic recommender on a prepared dataset, with the LM's metrics.

As the paper describes its baselines: Adam, learning rate 1e-3, batch 256, the L2 weight
chosen from {1e-3, ..., 1e-7} by validation HR@1 (``--l2 auto``), early stopping on
validation HR@1. Sequence models learn next-item prediction with a full softmax over the
item table; SASRec and GRU4Rec at every history position, Caser after the last one. Val and
test records are scored on their own 20 candidates and go through the same metric code as
`sdpo evaluate --protocol rank`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sdpo.allocator import keep_freed_memory
from sdpo.baselines.items import PAD, ItemTable
from sdpo.baselines.models import Caser, GRU4Rec, SASRec, SequentialRecommender
from sdpo.datasets import load_split
from sdpo.errors import UserError
from sdpo.evaluation import Evaluation, score_rankings
from sdpo.io import write_json
from sdpo.records import Record

MODELS = ("sasrec", "gru4rec", "caser", "popularity")
L2_GRID = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


@dataclass
class BaselineConfig:
    model: str = field(default="sasrec", metadata={"help": "sasrec, gru4rec, caser or popularity"})
    data: str = field(default="", metadata={"help": "prepared dataset folder"})
    output_dir: str = field(default="runs/baseline", metadata={"help": "where the model, metrics and predictions go"})
    l2: str = field(default="auto", metadata={"help": "L2 weight, or auto: chosen from 1e-3..1e-7 on val HR@1"})
    learning_rate: float = 1e-3
    batch_size: int = 256
    max_epochs: int = 40
    patience: int = field(default=4, metadata={"help": "epochs without a better val HR@1 before stopping"})
    dim: int = 64
    max_len: int = field(default=10, metadata={"help": "most recent history items used"})
    eval_split: str = field(default="test", metadata={"help": "split reported in metrics.json"})
    eval_limit: int | None = field(default=None, metadata={"help": "report on the first N records of eval_split only"})
    seed: int = 0
    progress: bool = True


@dataclass
class EncodedSplit:
    records: list[Record]
    histories: torch.Tensor  # [N, L] left-padded item ids
    targets: torch.Tensor  # [N]
    candidates: torch.Tensor  # [N, C]


def encode(records: list[Record], items: ItemTable, max_len: int) -> EncodedSplit:
    histories = []
    for record in records:
        ids = [items.id_of(t) for t in record.history[-max_len:]]
        histories.append([PAD] * (max_len - len(ids)) + ids)
    return EncodedSplit(
        records,
        torch.tensor(histories),
        torch.tensor([items.id_of(r.target) for r in records]),
        torch.tensor([[items.id_of(c) for c in r.candidates] for r in records]),
    )


def build_model(name: str, n_items: int, config: BaselineConfig) -> SequentialRecommender:
    if name == "sasrec":
        return SASRec(n_items, config.max_len, config.dim)
    if name == "gru4rec":
        return GRU4Rec(n_items, config.dim)
    if name == "caser":
        return Caser(n_items, window=min(5, config.max_len), dim=config.dim)
    raise UserError(f"unknown baseline {name!r}; choose one of {', '.join(MODELS)}.")


def next_item_loss(model: SequentialRecommender, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next item: at every history position, or after the last one."""
    states = model.encode(histories)  # [B, L', D]
    if model.predicts_every_position:
        labels = torch.cat([histories[:, 1:], targets[:, None]], dim=1)  # the item after each position
        labels = labels.masked_fill(histories == PAD, -100)  # no prediction from padding
    else:
        labels = targets[:, None]
    logits = model.logits(states)  # [B, L', n_items]
    logits[..., PAD] = float("-inf")
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def rank_records(records: list[Record], scores: torch.Tensor) -> Evaluation:
    """Rank each record's candidates by `scores` [N, C] (ties keep candidate order) with the shared metrics."""
    rankings = [sorted(zip(r.candidates, row), key=lambda pair: -pair[1]) for r, row in zip(records, scores.tolist())]
    return score_rankings(records, rankings)


@torch.no_grad()
def model_scores(model: SequentialRecommender, split: EncodedSplit, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    parts = [model.score(split.histories[i : i + batch_size], split.candidates[i : i + batch_size]) for i in range(0, len(split.records), batch_size)]
    return torch.cat(parts)


def train_one(name: str, n_items: int, train: EncodedSplit, val: EncodedSplit, l2: float, config: BaselineConfig):
    """Train with one L2 weight; returns (best model state, best val HR@1, val HR@1 after each epoch)."""
    torch.manual_seed(config.seed)
    model = build_model(name, n_items, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=l2)
    generator = torch.Generator().manual_seed(config.seed)
    best_hr, best_state, stale, curve = -1.0, None, 0, []
    bar = tqdm(range(config.max_epochs), desc=f"{name} l2={l2:g}", disable=not config.progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(train.records), generator=generator)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = next_item_loss(model, train.histories[batch], train.targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        hr = rank_records(val.records, model_scores(model, val)).metrics["hr@1"]
        curve.append(round(hr, 4))
        bar.set_postfix(loss=f"{loss.item():.3f}", val_hr1=f"{hr:.4f}")
        if hr > best_hr:
            best_hr, stale = hr, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    return best_state, best_hr, curve


def popularity_scores(train: list[Record], split: list[Record]) -> torch.Tensor:
    """[N, C]: how often each candidate is a training target."""
    counts: dict[str, int] = {}
    for record in train:
        counts[record.target] = counts.get(record.target, 0) + 1
    return torch.tensor([[float(counts.get(c, 0)) for c in r.candidates] for r in split])


def l2_values(l2: str) -> list[float]:
    if l2 == "auto":
        return list(L2_GRID)
    try:
        return [float(l2)]
    except ValueError:
        raise UserError(f"--l2 must be a number or auto, got {l2!r}.") from None


def run_baseline(config: BaselineConfig) -> dict[str, Any]:
    """Train (or count, for popularity), evaluate on config.eval_split, and save everything."""
    if config.model not in MODELS:
        raise UserError(f"unknown baseline {config.model!r}; choose one of {', '.join(MODELS)}.")
    if not config.data:
        raise UserError("baseline: no dataset given. Pass --data DIR (a folder made by sdpo data prepare).")
    started = time.perf_counter()
    out = Path(config.output_dir)
    train_records = load_split(config.data, "train")
    eval_records = load_split(config.data, config.eval_split, limit=config.eval_limit)
    info: dict[str, Any] = {"model": config.model, "data": config.data, "split": config.eval_split}
    if config.model == "popularity":
        result = rank_records(eval_records, popularity_scores(train_records, eval_records))
    else:
        keep_freed_memory()
        items = ItemTable.from_records(train_records)
        train = encode(train_records, items, config.max_len)
        val = encode(load_split(config.data, "val"), items, config.max_len)
        search = []
        best = None
        for l2 in l2_values(config.l2):
            state, hr, curve = train_one(config.model, len(items), train, val, l2, config)
            search.append({"l2": l2, "val_hr@1": hr, "epochs": len(curve), "val_hr@1_by_epoch": curve})
            if best is None or hr > best[1]:
                best = (l2, hr, state)
        l2, val_hr, state = best
        model = build_model(config.model, len(items), config)
        model.load_state_dict(state)
        result = rank_records(eval_records, model_scores(model, encode(eval_records, items, config.max_len)))
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
        items.save(out / "items.json")
        info.update({"l2": l2, "val_hr@1": val_hr, "l2_search": search, **items.coverage(eval_records)})
    result.metrics = {**result.metrics, "n_records": len(eval_records), "seconds": round(time.perf_counter() - started, 2), **info}
    write_json(out / "config.json", {k: v for k, v in vars(config).items()})
    result.save(out)
    return result.metrics

