import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sdpo.data.datasets import load_split, read_manifest, write_prepared

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (scripts/test.sh runs the suite on every core), each worker's torch gets its share of the cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(workers)))


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The local data mirror (SDPO_MIRROR, default ../shared/data beside the repository)."""
    path = Path(os.environ.get("SDPO_MIRROR", REPO.parent / "shared" / "data"))
    assert (path / "lastfm" / "id2name.txt").is_file(), f"no data mirror at {path}; set SDPO_MIRROR"
    return path


@pytest.fixture(scope="session")
def lastfm_dir(mirror, tmp_path_factory) -> Path:
    """LastFM prepared once for the whole session, from the mirror."""
    from sdpo.data.prepare import prepare_dataset

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
    from sdpo.lm.models import load_model

    model, tokenizer = load_model("tiny")
    return model.eval(), tokenizer


# The tiny study: SFT then DPO on a handful of records, both protocols, popularity; a few seconds of training.
TINY_STUDY = {
    "model": "tiny",
    "prompt_seed": 3,
    "sft": {"train_limit": 8, "max_steps": 2, "per_device_train_batch_size": 4, "disable_tqdm": True, "lora_layers": 1},
    "align": [{"name": "dpo", "loss": "dpo", "negatives": 1, "train_limit": 4, "max_steps": 1, "disable_tqdm": True}],
    "evaluate": {"split": "test", "limit": 3, "protocols": ["rank", "generate"], "batch_size": 2},
    "baselines": {"models": ["popularity"]},
}


@pytest.fixture(scope="session")
def tiny_study(small_data, tmp_path_factory):
    """The tiny study run once, uninterrupted: `sdpo pipeline tiny.yaml --output_dir studies/tiny` in a work folder.

    Tests that change the run copy `work` first (relative paths keep the copy whole).
    """
    from tests.helpers import sdpo

    work = tmp_path_factory.mktemp("uninterrupted")
    config = {**TINY_STUDY, "data": {"path": str(small_data)}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    result = sdpo("pipeline", "tiny.yaml", "--output_dir", "studies/tiny", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(config=config, work=work, out=Path("studies/tiny"), stdout=result.stdout)


@pytest.fixture(scope="session")
def sasrec_dir(small_data, tmp_path_factory) -> Path:
    """A SASRec trained one epoch on the small data: the collaborative model of the collaborative-token tests."""
    from sdpo.baselines.train import BaselineConfig, run_baseline

    folder = tmp_path_factory.mktemp("collaborative-model") / "sasrec"
    run_baseline(BaselineConfig(model="sasrec", data=str(small_data), output_dir=str(folder), l2="1e-4", max_epochs=1, max_len=6,
                                progress=False))
    return folder
