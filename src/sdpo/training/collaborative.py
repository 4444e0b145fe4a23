"""A run's collaborative tokens: which trained model it reads, its projectors' shape, its prompts.

A run with ``--collaborative DIR`` (a trained ``sdpo baseline``: SASRec, GRU4Rec or Caser) puts
that model's item vectors and user state into its prompts as soft tokens (`sdpo.lm.soft_tokens`).
The run records the folder and the SHA-256 of its weights (``collaborative_sha256``); an align
run, an evaluation or a recommender that reads the run later loads the same model or refuses in
one line. Everything here takes a run's settings, as a config or as the dict its
``sdpo_config.yaml`` holds, so training, evaluation and the recommender build the same prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdpo.baselines.collaborative import CollaborativeModel
from sdpo.baselines.prompts import CollaborativePrompts
from sdpo.data.collaborative_prompts import PLACES
from sdpo.data.prompts import TextPrompts
from sdpo.errors import UserError
from sdpo.io import write_json
from sdpo.lm.soft_tokens import SoftTokenSpec, collaborative_tokens_of

SETTINGS = ("collaborative", "collaborative_sha256", "collaborative_place", "collaborative_score")
REPORT_FILE = "collaborative.json"


def _get(settings: Any, key: str) -> Any:
    return settings.get(key) if isinstance(settings, dict) else getattr(settings, key, None)


def load_collaborative(settings: Any, base: str | Path | None = None) -> CollaborativeModel | None:
    """The collaborative model a run names (None for a text-only run), checked against its recorded SHA-256.

    A relative folder is looked up from the working directory, then from `base` (the run folder that
    recorded it); an exported folder's from the folder itself, which carries the model inside.
    """
    folder = _get(settings, "collaborative")
    if not folder:
        return None
    place = _get(settings, "collaborative_place") or "before"
    if place not in PLACES:
        raise UserError(f"--collaborative_place must be before or after, got {place!r}.")
    path = Path(folder)
    if base is not None and not path.is_absolute():
        inside = Path(base) / path
        if _get(settings, "exported_from") or (not path.exists() and inside.exists()):  # sdpo.training.export.EXPORTED_FROM
            path = inside
    return CollaborativeModel.load(path, _get(settings, "collaborative_sha256") or None)


def soft_token_spec(settings: Any, source: CollaborativeModel | None) -> SoftTokenSpec | None:
    """The shape of the run's projectors (None without collaborative tokens)."""
    return None if source is None else SoftTokenSpec(source.dim, bool(_get(settings, "collaborative_score")))


def run_prompts(tokenizer, domain: str, seed: int, settings: Any, source: CollaborativeModel | None):
    """The prompts a run trains and is evaluated on: `TextPrompts`, or `CollaborativePrompts` over `source`."""
    if source is None:
        return TextPrompts(tokenizer, domain, seed)
    return CollaborativePrompts(tokenizer, domain, seed, source, _get(settings, "collaborative_place") or "before",
                                bool(_get(settings, "collaborative_score")))


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


def report_unknown(source: CollaborativeModel | None, out: str | Path) -> None:
    """Say how many titles the collaborative model had no id for, and write it to the run folder's collaborative.json."""
    from accelerate import PartialState

    if source is None or not PartialState().is_main_process:  # each process counted its own share: one writer
        return
    unknown = source.unknown_titles
    print(f"[collaborative] {sum(unknown.values())} title occurrences ({len(unknown)} distinct titles) had no id in "
          f"{source.folder}: they read the learned unknown vector")
    write_json(Path(out) / REPORT_FILE, {**source.describe(), "unknown_occurrences": sum(unknown.values()),
                                         "unknown_titles": len(unknown), "most_common_unknown": unknown.most_common(20)})


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
