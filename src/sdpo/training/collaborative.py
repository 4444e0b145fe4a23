"""A run's collaborative tokens: which trained model it reads, its projectors' shape, its prompts.

A run with ``--collaborative DIR`` (a trained ``sdpo baseline``: SASRec, GRU4Rec or Caser) puts
that model's item vectors and user state into its prompts as soft tokens (`sdpo.lm.soft_tokens`).
The run records the folder and the model's fingerprint (``collaborative_sha256``, of its weights,
item table and config); an align run, an evaluation or a recommender that reads the run later loads
the same model or refuses in one line. Everything here takes a run's settings, as a config or as the dict its
``sdpo_config.yaml`` holds, so training, evaluation and the recommender build the same prompts.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from sdpo.baselines.collaborative import CollaborativeModel
from sdpo.baselines.prompts import CollaborativePrompts
from sdpo.baselines.stack import StackedCollaborative, is_stack
from sdpo.data.collaborative_prompts import PLACES
from sdpo.data.prompts import TextPrompts
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.io import write_json
from sdpo.lm.soft_tokens import SoftTokenSpec, collaborative_tokens_of

SETTINGS = ("collaborative", "collaborative_sha256", "collaborative_place", "collaborative_score", "collaborative_inject",
            "collaborative_layer")
REPORT_FILE = "collaborative.json"


def _get(settings: Any, key: str) -> Any:
    return settings.get(key) if isinstance(settings, dict) else getattr(settings, key, None)


def load_collaborative(settings: Any) -> CollaborativeModel | None:
    """The collaborative model a run names (None for a text-only run), checked against its recorded SHA-256.

    A run's options name the folder from the working folder; a run folder's recorded config names it as
    `sdpo.training.runs.read_run_config` found it (an export's own ``collaborative/`` folder, a study's baseline).
    """
    folder = _get(settings, "collaborative")
    if not folder:
        return None
    place = _get(settings, "collaborative_place") or "before"
    if place not in PLACES:
        raise UserError(f"--collaborative_place must be before or after, got {place!r}.")
    if is_stack(folder):  # several models side by side (sdpo stack), read where one model is
        return StackedCollaborative.load(folder, _get(settings, "collaborative_sha256") or None)
    return CollaborativeModel.load(folder, _get(settings, "collaborative_sha256") or None)


def soft_token_spec(settings: Any, source: CollaborativeModel | None) -> SoftTokenSpec | None:
    """The shape of the run's projectors (None without collaborative tokens)."""
    if source is None:
        return None
    return SoftTokenSpec(source.dim, bool(_get(settings, "collaborative_score")), scores=len(getattr(source, "segments", None) or [source.dim]),
                         layer=_get(settings, "collaborative_layer") or 0)


def run_prompts(tokenizer, domain: str, seed: int, settings: Any, source: CollaborativeModel | None):
    """The prompts a run trains and is evaluated on: `TextPrompts`, or `CollaborativePrompts` over `source`."""
    if source is None:
        return TextPrompts(tokenizer, domain, seed)
    return CollaborativePrompts(tokenizer, domain, seed, source, _get(settings, "collaborative_place") or "before",
                                bool(_get(settings, "collaborative_score")))


def cross_fitted(config: Any, source: CollaborativeModel | None, train: list[Record]):
    """`source`, or with ``--collaborative_folds`` its fold models for the `train` records (`CrossFitted`), recorded in `config`."""
    if source is None or not config.collaborative_folds:
        return source
    from sdpo.baselines.crossfit import CrossFitted

    fitted = CrossFitted.load(source, config.collaborative_folds_sha256 or None)
    config.collaborative_folds_sha256 = [model.sha256 for model in fitted.folds]
    for entry in fitted.describe():
        print(f"[collaborative] fold model {entry['sha256'][:12]}...: its space is {entry['alignment_error']:.1%} from the main "
              "model's after the orthogonal map", file=sys.stderr)
    return fitted.for_training(train)


def record_collaborative(config: Any, source: CollaborativeModel | None) -> None:
    """Fill in the run's collaborative settings as they resolved (the model's SHA-256, the token place)."""
    if source is not None:
        config.collaborative = str(source.folder)  # as found: inside an exported SFT folder, say
        config.collaborative_sha256 = source.sha256
        config.collaborative_place = config.collaborative_place or "before"
        config.collaborative_score = bool(config.collaborative_score)


def freeze_projectors(model) -> None:
    """Keep the model's projectors as they are (``--no_train_projector``)."""
    tokens = collaborative_tokens_of(model)
    if tokens is not None:
        tokens.requires_grad_(False)


MIN_KNOWN_SHARE = 0.5  # a model of the data's own catalogue knows nearly every title; one of another knows few


def check_catalogue(source: CollaborativeModel | None, records: list[Record]) -> None:
    """A user error when the collaborative model knows fewer than half of the distinct titles of `records` (another catalogue's model).

    Given training records, a model of this data knows every title of them (its item table was built from them)."""
    if source is None or not records:
        return
    titles = {title for record in records for title in (*record.history, *record.candidates)}
    share = 1 - len(source.unknown_titles(records)) / len(titles)
    if share < MIN_KNOWN_SHARE:
        raise UserError(f"{source.folder}: the collaborative model knows {share:.0%} of the {len(titles):,} distinct titles of these "
                        "records, so it was trained on another catalogue. Give a model trained on this dataset "
                        "(sdpo baseline --model sasrec --data DIR).")


def unknown_summary(source: CollaborativeModel, records: list[Record]) -> dict[str, Any]:
    """How many title occurrences of `records` (histories and candidates) have no id in the model, how many distinct, which most often.

    Counted over the records themselves, so the count is the whole run's however many processes share it."""
    unknown = source.unknown_titles(records)
    return {"unknown_occurrences": sum(unknown.values()), "unknown_titles": len(unknown), "most_common_unknown": unknown.most_common(20)}


def say_unknown(source: CollaborativeModel, summary: dict[str, Any], what: str) -> None:
    """One line on stderr: how many of `what` had no id in the model and read the learned unknown vector."""
    print(f"[collaborative] {summary['unknown_occurrences']} title occurrences ({summary['unknown_titles']} distinct titles) of {what} "
          f"had no id in {source.folder}: they read the learned unknown vector", file=sys.stderr)


def report_unknown(source: CollaborativeModel | None, records: list[Record], out: str | Path) -> None:
    """Say how many titles of the training records the collaborative model had no id for, and write it to the run's collaborative.json."""
    from accelerate import PartialState

    if source is None or not PartialState().is_main_process:  # every process holds every record: one writer
        return
    summary = unknown_summary(source, records)
    say_unknown(source, summary, f"the {len(records)} training records")
    write_json(Path(out) / REPORT_FILE, {**source.describe(), **summary})


class ProjectorLearningRate:
    """Trainer mixin: the projectors train at ``--projector_learning_rate`` when it is given, LoRA at the learning rate.

    The scheduler scales both alike (warm-up, decay); the optimizer is the one TrainingArguments names.
    """

    def create_optimizer(self, model=None):
        if not getattr(self.args, "train_projector", True):
            freeze_projectors(model if model is not None else self.model)  # PEFT's set_adapter (a resume) unfreezes them
        rate = getattr(self.args, "projector_learning_rate", None)
        if rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = model if model is not None else self.model
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        projectors = [p for name, p in trained if ".collaborative_tokens." in f".{name}"]
        others = [p for name, p in trained if ".collaborative_tokens." not in f".{name}"]
        optimizer_class, options = self.get_optimizer_cls_and_kwargs(self.args, model)
        decay = self.args.weight_decay
        groups = [{"params": others, "weight_decay": decay}, {"params": projectors, "lr": rate, "weight_decay": decay}]
        self.optimizer = optimizer_class([group for group in groups if group["params"]], **options)
        return self.optimizer
