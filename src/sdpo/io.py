"""Small file helpers: write a file whole or not at all."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sdpo.errors import UserError


def refuse_non_empty(folder: str | Path, overwrite: bool, flag: str, hint: str = "") -> None:
    """A user error if `folder` holds anything and `overwrite` is off: nothing a user made is lost."""
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"{folder} is not empty{hint}. Choose another {flag}, or pass --overwrite.")


TEMPORARY_SUFFIX = ".sdpo-tmp"  # the files replace_atomic writes before renaming them into place


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that `replace_atomic` leaves in `folder` when a process is killed mid-write."""
    folder = Path(folder)
    stale = [p for p in folder.glob(f".*{TEMPORARY_SUFFIX}") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def replace_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under `folder`."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it into place."""
    replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    """One JSON value per line; gzip-compressed where `path` ends in .gz (the same bytes for the same rows)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if str(path).endswith(".gz"):
        replace_atomic(path, lambda tmp: tmp.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0)))
    else:
        write_text_atomic(path, text)


def read_jsonl(path: str | Path) -> list[Any]:
    """The values of a JSON-lines file, plain or gzip-compressed (.gz); blank lines skipped.

    A missing file raises FileNotFoundError; a line that is not JSON, ValueError.
    """
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def write_folder_atomic(folder: str | Path, fill: Callable[[Path], None], *, keep: Callable[[Path], bool] | None = None) -> Path:
    """Run ``fill(staging)`` on a temporary sibling folder, then rename it to `folder`.

    `folder` is replaced only once `fill` has finished; if it raises, nothing changes. With `keep` (a cache that
    any process may fill, e.g. two ranks of one launch converting the same model: ``keep(folder)`` says a copy is
    whole), a whole `folder` that another process put in place meanwhile is kept and this copy dropped, so a
    reader never loses it; one that is not whole is replaced.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        fill(staging)
        staging.chmod(0o755)
        if folder.exists():
            if keep is not None and keep(folder):
                return folder
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError:  # another process renamed its copy into place between our check and our rename
            if not (keep is not None and keep(folder)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def relative_to_folder(path: str | Path, folder: str | Path) -> str:
    """`path` written relative to `folder` ('/'-separated), as a file in a folder that travels whole records it."""
    return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()


def find_recorded(value: str | Path, base: str | Path) -> Path:
    """Where a path that a file in folder `base` recorded lies now.

    Absolute: as it is. Relative: from `base` or the nearest folder above it that holds it (a study records
    its paths relative to the study folder, an exported run relative to itself); where none does, as it is,
    from the working folder (what older sdpo versions recorded). Normalised; relative where `value` and `base` are."""
    value = Path(value)
    if value.is_absolute():
        return value
    base = Path(base)
    for folder in (base, *base.parents):
        if (folder / value).exists():
            return Path(os.path.normpath(folder / value))
    if not base.is_absolute():  # a relative base's parents end at the working folder: look above it too, and stay relative
        for folder in Path.cwd().parents:
            if (folder / value).exists():
                return Path(os.path.relpath(folder / value))
    return value
