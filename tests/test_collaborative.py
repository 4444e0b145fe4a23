"""A trained baseline read as the source of collaborative tokens: its vectors, states and scores are the model's own."""

import json

import pytest
import torch

from sdpo.baselines.collaborative import CollaborativeModel, model_sha256
from sdpo.baselines.items import UNKNOWN
from sdpo.baselines.train import BaselineConfig, encode, model_scores, run_baseline
from sdpo.data.datasets import load_split
from sdpo.data.records import Record
from sdpo.data.sources.fetch import sha256_of
from sdpo.errors import UserError


@pytest.fixture(scope="module", params=["sasrec", "caser"])
def trained(request, small_data, tmp_path_factory):
    """A SASRec (every position) and a Caser (last window only), one epoch on the small data."""
    folder = tmp_path_factory.mktemp("collaborative") / request.param
    run_baseline(BaselineConfig(model=request.param, data=str(small_data), output_dir=str(folder), l2="1e-4", max_epochs=1,
                                max_len=6, progress=False))
    return folder


def test_scores_are_the_models_own_and_the_dot_product_of_state_and_vectors(trained, small_data):
    source = CollaborativeModel.load(trained)
    records = load_split(small_data, "test")
    assert max(len(r.history) for r in records) > source.max_len  # histories longer than the model reads
    batch = source.encode(records)
    expected = model_scores(source.model, encode(records, source.items, source.max_len))  # what sdpo baseline ranked by
    assert torch.allclose(batch.scores, expected, atol=1e-5)
    assert torch.allclose(batch.scores, torch.einsum("bd,bcd->bc", batch.user, batch.candidates), atol=1e-6)
    ids = torch.tensor([[source.items.id_of(c) for c in r.candidates] for r in records])
    assert torch.equal(batch.candidates, source.model.item_embedding.weight[ids])
    longest = max(len(r.history) for r in records)
    assert batch.history.shape == (len(records), longest, source.dim) and batch.candidates.shape == (len(records), 20, source.dim)
    # histories are left-padded; padding is not a known item
    for row, record in enumerate(records):
        assert not batch.history_known[row, : longest - len(record.history)].any()
    assert not batch.user.requires_grad and not any(p.requires_grad for p in source.model.parameters())


def test_a_title_without_an_id_is_flagged_and_counted(trained):
    source = CollaborativeModel.load(trained)
    known = source.items.titles  # titles of its training records
    unseen = Record("x", None, [*known[:5], "No Such Band"], [*known[5:24], "Nobody Either"], known[5])
    batch = source.encode([unseen])
    assert batch.history_known[0].tolist() == [True] * 5 + [False]
    assert batch.candidate_known[0].tolist() == [True] * 19 + [False]
    assert torch.equal(batch.candidates[0, -1], source.model.item_embedding.weight[UNKNOWN])
    assert source.unknown_titles([unseen]) == {"No Such Band": 1, "Nobody Either": 1}


def test_the_run_names_the_model_by_its_weights_and_refuses_another(trained, tmp_path):
    source = CollaborativeModel.load(trained)
    assert source.describe() == {"path": str(trained), "sha256": model_sha256(trained), "model": trained.name, "dim": source.dim}
    assert source.weights_sha256 == sha256_of(trained / "model.safetensors") != source.sha256
    assert CollaborativeModel.load(trained, sha256=source.sha256).sha256 == source.sha256
    with pytest.raises(UserError, match="SHA-256 .* not the 000000000000... this run was trained with"):
        CollaborativeModel.load(trained, sha256="0" * 64)
    with pytest.raises(UserError, match="not a trained collaborative model \\(config.json, items.json, model.safetensors missing\\)"):
        CollaborativeModel.load(tmp_path)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "items.json"):
        (damaged / name).write_text((trained / name).read_text())
    (damaged / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(UserError, match="unreadable as a collaborative model"):
        CollaborativeModel.load(damaged)
    (damaged / "config.json").write_text(json.dumps({**json.loads((trained / "config.json").read_text()), "model": "popularity"}))
    (damaged / "model.safetensors").write_bytes((trained / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="popularity has no item vectors"):
        CollaborativeModel.load(damaged)
