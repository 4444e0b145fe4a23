"""A pipeline's output folder as a study that git can carry from one checkout to the next.

`sdpo pipeline CONFIG --output_dir studies/NAME` writes ``studies/NAME/.gitignore``, which lets
git keep exactly what a fresh checkout needs to continue the study with the same command:

- each finished training stage's adapter; every training stage's resolved config and training
  log (an unfinished stage's are written again when it restarts);
- of a stage imported from a run elsewhere (``adapter: DIR``), its config and log but not its
  weights: they are the source's bytes, which a fresh checkout copies again (a study would
  otherwise carry every shipped adapter it starts from twice);
- each finished evaluation's metrics and its per-record predictions (gzip-compressed; plain in
  folders an older sdpo wrote);
- the journal of an unfinished evaluation (its finished batches);
- each finished baseline's metrics, predictions, weights and item table;
- the results table.

Checkpoints, the reference table, the trunk cache and the prepared data stay out: a fresh
checkout rebuilds them (the data from its source with the recorded seed, an unfinished
training stage from its start), so the continued study reaches the same numbers.

Every path those files record that lies inside the study (its data, a stage, a baseline) is
written relative to the study folder (`record_paths_in_study`), so the folder works wherever a
clone puts it and from whatever folder the pipeline is run.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from sdpo.errors import UserError
from sdpo.io import relative_to_folder, write_json, write_text_atomic

GITIGNORE = ".gitignore"
KEPT_FILES = (
    GITIGNORE, "results.json", "results.md",  # the pipeline's table
    "sdpo_config.yaml", "adapter_config.json", "adapter_model.safetensors", "log.jsonl", "collaborative.json",  # a finished training stage
    "metrics.json", "predictions.jsonl.gz", "predictions.jsonl", "progress.jsonl.gz", "progress.jsonl",  # an evaluation, finished or under way
    "model.safetensors", "items.json", "config.json",  # a finished baseline
)
REBUILT_FOLDERS = ("checkpoint-[0-9]*", "reference-cache", "trunk-cache", "runs")  # checkpoints, caches, tensorboard
MAX_WEIGHTS_BYTES = 8 * 1024 * 1024  # a stage's or baseline's weights (adapter_dtype bf16 halves an adapter's)
MAX_TRACKED_BYTES = 1024 * 1024  # any other file git carries


HEADER = "# Written by sdpo pipeline (sdpo.pipeline.study): git keeps what a fresh checkout needs to continue"


IMPORTED_COPIES = ("adapter_model.safetensors", "collaborative")  # what an imported stage's folder holds of its source's weights


def gitignore_text(imported: Sequence[str] = ()) -> str:
    """The study folder's .gitignore: everything is ignored but the files a continuation reads, less the weights of the
    `imported` stages (copies of a run elsewhere, copied again by the pipeline)."""
    lines = [HEADER, "# this study with the same command; checkpoints, caches and the prepared data are rebuilt there.", "*", "!*/"]
    lines += [f"!{name}" for name in KEPT_FILES]
    lines += ["/data/"] + [f"{folder}/" for folder in REBUILT_FOLDERS]
    lines += [f"/{_escaped(stage)}/{copy}" for stage in imported for copy in IMPORTED_COPIES]
    return "\n".join(lines) + "\n"


def _escaped(name: str) -> str:
    """A stage name as a literal gitignore pattern (its wildcards and leading ! or # escaped)."""
    return re.sub(r"([*?\[\\!#])", r"\\\1", name)


def check_gitignore(out: Path) -> None:
    """A user error if `out` holds a .gitignore that sdpo did not write (a pipeline's folder gets its own)."""
    path = Path(out) / GITIGNORE
    if path.is_file() and not path.read_text(encoding="utf-8", errors="replace").startswith(HEADER):
        raise UserError(f"{path} is not one sdpo wrote; a pipeline's output folder gets its own .gitignore. "
                        "Choose another --output_dir (e.g. studies/NAME), or move that file away.")


def write_gitignore(out: Path, imported: Sequence[str] = ()) -> None:
    """Give the output folder its .gitignore (rewritten where an older sdpo wrote another; a user's own is refused)."""
    check_gitignore(out)
    path = Path(out) / GITIGNORE
    if not path.is_file() or path.read_text(encoding="utf-8") != gitignore_text(imported):
        write_text_atomic(path, gitignore_text(imported))


def kept_files(out: Path, imported: Sequence[str] = ()) -> list[Path]:
    """The files under `out` that its .gitignore (written with the same `imported` stages) lets git track: what
    `git add` takes where no other ignore rule applies (tests/test_study.py holds this to git itself)."""
    out = Path(out)
    kept = []
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        folders = relative.parts[:-1]
        if not path.is_file() or path.name not in KEPT_FILES or (folders and folders[0] == "data"):
            continue
        if any(fnmatch.fnmatch(folder, pattern) for folder in folders for pattern in REBUILT_FOLDERS):
            continue
        if len(relative.parts) > 1 and relative.parts[0] in imported and relative.parts[1] in IMPORTED_COPIES:
            continue
        kept.append(path)
    return kept


def committable(out: Path) -> bool:
    """Whether git would carry `out`: it lies in a git work tree and no .gitignore there (e.g. /runs/) leaves it out."""
    try:  # check-ignore exits 0 for an ignored path, 1 for one git carries, 128 outside a work tree
        return subprocess.run(["git", "-C", str(out), "check-ignore", "-q", "."], capture_output=True).returncode == 1
    except OSError:  # no git on this machine: nothing is committed from here
        return False


def warn_about_large_files(out: Path, imported: Sequence[str] = ()) -> list[Path]:
    """Name each file git would track that is too large to commit (weights over 8 MiB, anything else over 1 MiB); returns them."""
    large = []
    for path in kept_files(out, imported):
        weights = path.suffix == ".safetensors"
        limit = MAX_WEIGHTS_BYTES if weights else MAX_TRACKED_BYTES
        if path.stat().st_size > limit:
            large.append(path)
            if weights:
                hint = "store the stage's adapter in bf16 (adapter_dtype: bf16) or train LoRA on fewer layers (lora_layers)"
            elif path.name.startswith(("predictions", "progress")):
                hint = "evaluate fewer records (evaluate.limit), or commit it through Git LFS"
            else:
                hint = "commit it through Git LFS"
            print(f"[study] {path} is {path.stat().st_size / 2**20:.1f} MiB, over the {limit // 2**20} MiB a committed study file "
                  f"may be: {hint}.")
    return large


# keys whose values name a folder or file (sdpo_config.yaml, metrics.json, results.json, a baseline's config.json, collaborative.json)
PATH_KEYS = ("data", "sft", "collaborative", "output_dir", "adapter", "path", "reference", "retriever_dir", "exported_from")


def _in_study(value: Any, study: Path) -> str | None:
    """`value` relative to the study folder where it names a place inside it (absolute, or from the working folder); else None."""
    if not isinstance(value, str) or not value:
        return None
    place = Path(os.path.abspath(value))  # lexically: the place may be gone (the prepared data is not committed)
    if place != study and study not in place.parents:
        return None
    return relative_to_folder(place, study)


def _relative_paths(value: Any, study: Path) -> Any:
    """A copy of a JSON/YAML value whose path entries (`PATH_KEYS`) inside the study are relative to it."""
    if isinstance(value, list):
        return [_relative_paths(item, study) for item in value]
    if not isinstance(value, dict):
        return value
    return {key: (_in_study(item, study) or item) if key in PATH_KEYS and isinstance(item, str) else _relative_paths(item, study)
            for key, item in value.items()}


def record_paths_in_study(out: Path) -> list[Path]:
    """Rewrite the paths that the study's kept files record inside the study as relative to it; returns the files changed."""
    study = Path(os.path.abspath(out))
    changed = []
    for path in kept_files(out):
        if path.suffix not in (".json", ".yaml") or path.name == "items.json":
            continue
        text = path.read_text(encoding="utf-8")
        try:
            value = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
        except (ValueError, yaml.YAMLError):
            continue  # a damaged file is the stage's to report
        portable = _relative_paths(value, study)
        if portable == value:
            continue
        if path.suffix == ".yaml":
            write_text_atomic(path, yaml.safe_dump(portable, sort_keys=True, allow_unicode=True))
        else:
            write_json(path, portable)
        changed.append(path)
    return changed
