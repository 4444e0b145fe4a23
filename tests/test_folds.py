"""Out-of-fold collaborative models: fold models trained without their users, and training windows that read only those."""

import json
from collections import Counter

import pytest
import torch

import sdpo.baselines.train as baseline_train
from sdpo.baselines.collaborative import CollaborativeModel, model_sha256
from sdpo.baselines.crossfit import CrossFitted, procrustes
from sdpo.baselines.folds import FOLDS_FILE, fold_of
from sdpo.baselines.train import BaselineConfig, run_baseline
from sdpo.config import build_config
from sdpo.data.datasets import load_split
from sdpo.errors import UserError
from sdpo.training.runs import read_run_config
from sdpo.training.sft import SFTConfig, run_sft


@pytest.fixture(scope="module")
def folded(small_data, tmp_path_factory):
    """A SASRec with 3 fold models on the small data, and the users each model trained on (as train_one saw them)."""
    trained_users = []
    original = baseline_train.train_one

    def spying(name, n_items, train, *args, **kwargs):
        trained_users.append({r.user for r in train.records})
        return original(name, n_items, train, *args, **kwargs)

    folder = tmp_path_factory.mktemp("folds") / "sasrec"
    baseline_train.train_one = spying
    try:
        run_baseline(BaselineConfig(model="sasrec", data=str(small_data), output_dir=str(folder), l2="1e-4", max_epochs=1, max_len=6,
                                    progress=False, folds=3))
    finally:
        baseline_train.train_one = original
    return folder, trained_users


def test_fold_of_is_stable_and_spreads_users():
    users = [str(u) for u in range(300)]
    assert [fold_of(u, 5, 0) for u in users] == [fold_of(u, 5, 0) for u in users]
    counts = Counter(fold_of(u, 5, 0) for u in users)
    assert set(counts) == set(range(5)) and min(counts.values()) > 40
    assert [fold_of(u, 5, 1) for u in users] != [fold_of(u, 5, 0) for u in users]  # the seed draws another split


def test_no_training_window_reads_a_model_that_trained_on_its_user(folded, small_data):
    folder, trained_users = folded
    train = load_split(small_data, "train")
    main_users, fold_users = trained_users[0], trained_users[1:]  # the main model first, then folds 0, 1, 2
    assert main_users == {r.user for r in train} and len(fold_users) == 3
    fitted = CrossFitted.load(CollaborativeModel.load(folder)).for_training(train)
    readers = Counter()
    for record in train:
        fold = fitted.fold_of(record)
        readers[fold] += 1
        assert record.user not in fold_users[fold], (record.id, record.user, fold)
    assert sorted(readers) == [0, 1, 2]  # every fold model reads some windows
    summary = json.loads((folder / FOLDS_FILE).read_text())
    assert [m["sha256"] for m in summary["models"]] == [model_sha256(folder / "folds" / str(i)) for i in range(3)]
    assert [m["training_records"] for m in summary["models"]] == [sum(r.user in users for r in train) for users in fold_users]


def test_cross_fitted_rows_are_the_fold_models_turned_into_the_main_space(folded, small_data):
    folder, _ = folded
    main = CollaborativeModel.load(folder)
    train, val = load_split(small_data, "train", limit=6), load_split(small_data, "val", limit=2)
    fitted = CrossFitted.load(main).for_training(train)
    batch = fitted.encode(train + val)
    for row, record in enumerate(train + val):
        fold = fitted.fold_of(record)
        if fold < 0:  # a val record: the main model as it is
            own, rotation = main.encode([record]), torch.eye(main.dim)
        else:
            own, rotation = fitted.folds[fold].encode([record]), fitted.rotations[fold]
        assert torch.allclose(batch.scores[row, : len(record.candidates)], own.scores[0], atol=1e-5)  # its own scores
        assert torch.allclose(batch.user[row], own.user[0] @ rotation, atol=1e-5)
        assert torch.allclose(batch.candidates[row, : len(record.candidates)], own.candidates[0] @ rotation, atol=1e-5)
    assert all(fitted.fold_of(r) >= 0 for r in train) and all(fitted.fold_of(r) == -1 for r in val)


def test_procrustes_finds_a_known_rotation():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(50, 8, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    found = procrustes(source, source @ rotation)
    assert torch.allclose(found, rotation, atol=1e-5)
    assert torch.allclose(found @ found.T, torch.eye(8), atol=1e-5)


def test_baseline_refuses_one_fold(small_data, tmp_path):
    with pytest.raises(ValueError, match="--folds must be 0"):
        BaselineConfig(model="sasrec", data=str(small_data), output_dir=str(tmp_path / "b"), folds=1)


def test_sft_with_out_of_fold_signals_records_the_fold_models(folded, small_data, sasrec_dir, tmp_path, monkeypatch):
    folder, _ = folded
    owners = []
    encode = CrossFitted.encode

    def spying(self, records):
        owners.extend(self.fold_of(r) for r in records)
        return encode(self, records)

    monkeypatch.setattr(CrossFitted, "encode", spying)
    out = run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / "sft"), "max_steps": 1, "train_limit": 4,
        "disable_tqdm": True, "collaborative": str(folder), "collaborative_folds": True, "bf16": False,
    }))
    assert owners and all(owner >= 0 for owner in owners)  # the training windows were read out of fold
    recorded = read_run_config(out, "an SFT run")
    assert recorded["collaborative_folds"] is True
    assert recorded["collaborative_folds_sha256"] == [model_sha256(folder / "folds" / str(i)) for i in range(3)]
    with pytest.raises(UserError, match="no fold models"):  # a collaborative model trained without folds
        run_sft(build_config(SFTConfig, {
            "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / "sft-none"), "max_steps": 1, "train_limit": 4,
            "disable_tqdm": True, "collaborative": str(sasrec_dir), "collaborative_folds": True, "bf16": False,
        }))


def test_align_reads_the_folds_as_its_sft_run_did_unless_told(folded, small_data, tmp_path):
    from sdpo.training.preference import AlignConfig, run_align

    folder, _ = folded
    sft = run_sft(build_config(SFTConfig, {
        "model": "tiny", "data": str(small_data), "output_dir": str(tmp_path / "sft"), "max_steps": 1, "train_limit": 4,
        "disable_tqdm": True, "collaborative": str(folder), "collaborative_folds": True, "bf16": False,
    }))
    common = {"sft": str(sft), "negatives": 3, "max_steps": 1, "per_device_train_batch_size": 4, "disable_tqdm": True, "train_limit": 4,
              "bf16": False}
    inherited = read_run_config(run_align(build_config(AlignConfig, {**common, "output_dir": str(tmp_path / "a")})), "an align run")
    assert inherited["collaborative_folds"] is True and len(inherited["collaborative_folds_sha256"]) == 3
    in_sample = read_run_config(run_align(build_config(AlignConfig, {**common, "output_dir": str(tmp_path / "b"),
                                                                     "collaborative_folds": False})), "an align run")
    assert in_sample["collaborative_folds"] is False
    assert len(list((sft / "reference-cache").glob("*.safetensors"))) == 2  # the two read other prompts: two reference tables
