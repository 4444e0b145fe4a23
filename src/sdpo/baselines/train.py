"""Train and evaluate a classic recommender on a prepared dataset, with the LM's metrics.

As the paper describes its baselines: Adam, learning rate 1e-3, batch 256, the L2 weight
chosen from {1e-3, ..., 1e-7} by validation HR@1 (``--l2 auto``), early stopping on
validation HR@1. Sequence models learn next-item prediction with a full softmax over the
item table; SASRec and GRU4Rec at every history position, Caser after the last one. Val and
test records are scored on their own 20 candidates and go through the same metric code as
`sdpo evaluate --protocol rank`.

With ``--folds k`` it then trains k more models on user folds of the training split, each without
its fold's users (`sdpo.baselines.folds`): out-of-fold signals for a collaborative LM.

After every epoch the whole search (finished L2 weights, the best model so far, and the
model, optimizer and random states of the weight in training) is saved to
``checkpoint.pt`` in the output folder; ``--resume`` continues from it and ends with the
same numbers as an uninterrupted run. The checkpoint is removed once the results are written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sdpo.baselines.folds import check_users, train_folds
from sdpo.baselines.items import PAD, ItemTable
from sdpo.baselines.models import Caser, GRU4Rec, SASRec, SequentialRecommender
from sdpo.data.datasets import data_fingerprint, load_split
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.evaluation.metrics import target_ranks
from sdpo.evaluation.protocols import score_rankings
from sdpo.evaluation.results import Evaluation
from sdpo.io import refuse_non_empty, replace_atomic, write_json
from sdpo.lm.allocator import keep_freed_memory

MODELS = ("sasrec", "gru4rec", "caser", "popularity")
L2_GRID = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
CHECKPOINT = "checkpoint.pt"


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
    eval_limit: int | None = field(default=None, metadata={"help": "report on N records of eval_split drawn at random with subset_seed"})
    subset_seed: int = field(default=0, metadata={"help": "seed of the eval_limit draw (the same draw as sdpo evaluate --limit)"})
    seed: int = 0
    progress: bool = True
    resume: bool = field(default=False, metadata={"help": "continue the search saved in output_dir/checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"help": "allow writing into a non-empty output_dir"})
    compress_predictions: bool = field(default=False, metadata={"help": "write predictions.jsonl.gz (as a pipeline does)"})
    folds: int = field(default=0, metadata={
        "help": "k: also train k models on user folds, each without its fold's users (out-of-fold signals for a collaborative LM; 0: none)"})
    fold_seed: int = field(default=0, metadata={"help": "seed of the users' split into folds"})

    def __post_init__(self):
        if self.folds < 0 or self.folds == 1:
            raise ValueError(f"--folds must be 0 (none) or at least 2, got {self.folds}")

    def training_settings(self) -> dict[str, Any]:
        """The options a checkpoint must share with the run that resumes it."""
        keys = ("model", "data", "l2", "learning_rate", "batch_size", "max_epochs", "patience", "dim", "max_len", "seed", "folds", "fold_seed")
        return {k: getattr(self, k) for k in keys}


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


def train_step(model: SequentialRecommender, optimizer: torch.optim.Optimizer, histories: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One optimizer step on a batch of histories [B, L] and targets [B]; returns the loss."""
    loss = next_item_loss(model, histories, targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def rank_records(records: list[Record], scores: torch.Tensor) -> Evaluation:
    """Rank each record's candidates by `scores` [N, C] (seeded tie order) with the shared metrics."""
    return score_rankings(records, scores.tolist(), label="score")


@torch.no_grad()
def model_scores(model: SequentialRecommender, split: EncodedSplit, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    parts = [model.score(split.histories[i : i + batch_size], split.candidates[i : i + batch_size]) for i in range(0, len(split.records), batch_size)]
    return torch.cat(parts)


def hit_rate(model: SequentialRecommender, split: EncodedSplit) -> float:
    """HR@1 of `model` on an encoded split (the early-stopping and model-selection criterion)."""
    ranks = target_ranks(split.records, model_scores(model, split).tolist())
    return sum(r == 1 for r in ranks) / len(ranks)


def train_one(name: str, n_items: int, train: EncodedSplit, val: EncodedSplit, l2: float, config: BaselineConfig,
              resume: dict[str, Any] | None = None, save: Callable[[dict[str, Any]], None] | None = None):
    """Train with one L2 weight; returns (best model state, best val HR@1, val HR@1 after each epoch).

    `resume` is a state that `save` received after some epoch: training continues from there
    exactly as if it had never stopped (model, optimizer, shuffling and dropout states).
    """
    torch.manual_seed(config.seed)
    model = build_model(name, n_items, config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=l2)
    generator = torch.Generator().manual_seed(config.seed)
    run = {"curve": [], "best_hr": -1.0, "best_state": None, "stale": 0}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        run = {k: resume[k] for k in run}
    bar = tqdm(range(len(run["curve"]), config.max_epochs), desc=f"{name} l2={l2:g}", disable=not config.progress,
               initial=len(run["curve"]), total=config.max_epochs)
    for _ in bar:
        if run["stale"] >= config.patience:
            break
        model.train()
        order = torch.randperm(len(train.records), generator=generator)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = train_step(model, optimizer, train.histories[batch], train.targets[batch])
        hr = hit_rate(model, val)
        run["curve"].append(round(hr, 4))
        bar.set_postfix(loss=f"{loss.item():.3f}", val_hr1=f"{hr:.4f}")
        if hr > run["best_hr"]:
            run["best_hr"], run["stale"] = hr, 0
            run["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            run["stale"] += 1
        if save is not None:
            save({"l2": l2, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), **run})
    return run["best_state"], run["best_hr"], run["curve"]


def check_output_dir(config: BaselineConfig) -> dict[str, Any] | None:
    """The saved search to continue (with --resume), or None; refuses to overwrite a run."""
    out = Path(config.output_dir)
    path = out / CHECKPOINT
    if config.resume:
        if not path.is_file():
            finished = " (the run there is finished)" if (out / "metrics.json").is_file() else ""
            raise UserError(f"--resume: no {CHECKPOINT} in {out}{finished}. Start without --resume.")
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as exc:  # a checkpoint from another tool or version, or a damaged file
            raise UserError(f"--resume: cannot read {path} ({type(exc).__name__}). Start over with --overwrite.") from None
        now = config.training_settings()
        changed = [f"{k} {saved['settings'].get(k)!r} -> {v!r}" for k, v in now.items() if saved["settings"].get(k) != v]
        if changed:
            raise UserError(f"--resume: {path} was saved with other options ({'; '.join(changed)}). "
                            "Resume with the same options, or start in another --output_dir.")
        return saved
    refuse_non_empty(out, config.overwrite, "--output_dir", " (it has a checkpoint: add --resume to continue)" if path.is_file() else "")
    return None


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
    saved = check_output_dir(config)
    started = time.perf_counter() - (saved["seconds"] if saved else 0.0)
    out = Path(config.output_dir)
    train_records = load_split(config.data, "train")
    eval_records = load_split(config.data, config.eval_split, config.eval_limit, config.subset_seed)
    info: dict[str, Any] = {"model": config.model, "data": config.data, "split": config.eval_split, "data_sha256": data_fingerprint(config.data)}
    if config.model == "popularity":
        result = rank_records(eval_records, popularity_scores(train_records, eval_records))
    else:
        keep_freed_memory()
        if config.folds:
            check_users(train_records, "training records")  # before any training
        items = ItemTable.from_records(train_records)
        train = encode(train_records, items, config.max_len)
        val_records = load_split(config.data, "val")
        val = encode(val_records, items, config.max_len)
        search = saved["search"] if saved else []  # finished weights: l2, val_hr@1, epochs, val_hr@1_by_epoch
        best = saved["best"] if saved else None  # {"l2", "val_hr@1", "state"} of the best finished weight

        def save(current: dict[str, Any] | None) -> None:
            checkpoint = {"settings": config.training_settings(), "search": search, "best": best, "current": current,
                          "seconds": time.perf_counter() - started}
            replace_atomic(out / CHECKPOINT, lambda tmp: torch.save(checkpoint, tmp))

        for l2 in l2_values(config.l2):
            if any(entry["l2"] == l2 for entry in search):
                continue
            current = saved["current"] if saved and saved["current"] and saved["current"]["l2"] == l2 else None
            state, hr, curve = train_one(config.model, len(items), train, val, l2, config, current, save)
            search.append({"l2": l2, "val_hr@1": hr, "epochs": len(curve), "val_hr@1_by_epoch": curve})
            if best is None or hr > best["val_hr@1"]:
                best = {"l2": l2, "val_hr@1": hr, "state": state}
            save(None)
        model = build_model(config.model, len(items), config)
        model.load_state_dict(best["state"])
        result = rank_records(eval_records, model_scores(model, encode(eval_records, items, config.max_len)))
        weights = {k: v.contiguous() for k, v in best["state"].items()}
        replace_atomic(out / "model.safetensors", lambda tmp: save_file(weights, str(tmp)))
        items.save(out / "items.json")
        info.update({"l2": best["l2"], "val_hr@1": best["val_hr@1"], "l2_search": search, **items.coverage(eval_records)})
        if config.folds:
            info["folds"] = train_folds(config, train_records, items, best["l2"],
                                        lambda kept: train_one(config.model, len(items), encode(kept, items, config.max_len), val, best["l2"], config))
    result.metrics = {**result.metrics, "n_records": len(eval_records), "seconds": round(time.perf_counter() - started, 2), **info}
    write_json(out / "config.json", {k: v for k, v in vars(config).items()})
    result.save(out, compress=config.compress_predictions)
    (out / CHECKPOINT).unlink(missing_ok=True)
    return result.metrics

