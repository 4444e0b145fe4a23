import os
from pathlib import Path

import pytest

from sdpo.datasets import load_split, read_manifest, write_prepared

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The local data mirror (SDPO_MIRROR, default ../shared/data beside the repository)."""
    path = Path(os.environ.get("SDPO_MIRROR", REPO.parent / "shared" / "data"))
    assert (path / "lastfm" / "id2name.txt").is_file(), f"no data mirror at {path}; set SDPO_MIRROR"
    return path


@pytest.fixture(scope="session")
def lastfm_dir(mirror, tmp_path_factory) -> Path:
    """LastFM prepared once for the whole session, from the mirror."""
    from sdpo.pipeline import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "lastfm"
    prepare_dataset("lastfm", out, seed=0, mirror=mirror, raw_dir=tmp_path_factory.mktemp("raw"))
    return out


@pytest.fixture(scope="session")
def small_data(lastfm_dir, tmp_path_factory) -> Path:
    """A small prepared folder: the first 24 train, 8 val and 8 test LastFM records."""
    out = tmp_path_factory.mktemp("small") / "lastfm-small"
    sizes = {"train": 24, "val": 8, "test": 8}
    splits = {split: load_split(lastfm_dir, split, limit=n) for split, n in sizes.items()}
    manifest = {k: v for k, v in read_manifest(lastfm_dir).items() if k != "counts"}
    write_prepared(out, splits, manifest)
    return out


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the seeded tiny random Llama with the SmolLM2 tokenizer, in eval mode."""
    from sdpo.models import load_model

    model, tokenizer = load_model("tiny")
    return model.eval(), tokenizer
