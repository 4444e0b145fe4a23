"""Titles a collaborative model never saw: the unknown vector learns in training, and every command counts them."""

import pytest
import torch
from safetensors.torch import load_file

from sdpo.benchmarks.unknown_titles import UNSEEN, with_unseen_history
from sdpo.data.datasets import load_split
from sdpo.lm.soft_tokens import CollaborativeTokens, SoftTokenSpec
from tests.test_collaborative_runs import sft_run


def unknown_vectors(run_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run_dir / "adapter_model.safetensors")).items() if k.endswith(".unknown")}


def test_in_train_mode_a_share_of_known_items_reads_the_unknown_vector_and_none_in_eval_mode():
    tokens = CollaborativeTokens(SoftTokenSpec(dim=4), hidden_size=8, norm=1.0)
    with torch.no_grad():
        tokens.items.unknown.fill_(3.0)  # an unknown row then differs from every known one
    vectors, known = torch.randn(1, 4000, 4), torch.ones(1, 4000, dtype=torch.bool)
    is_user = torch.zeros(1, 4000, dtype=torch.bool)
    unknown_row = tokens.items(torch.full((1, 4), 3.0))[0]
    tokens.unknown_rate = 0.25

    def share_unknown(out):
        return (out[0] - unknown_row).abs().amax(-1).lt(1e-6).float().mean().item()

    torch.manual_seed(0)
    assert share_unknown(tokens.train()(vectors, is_user, known)) == pytest.approx(0.25, abs=0.03)
    assert share_unknown(tokens.eval()(vectors, is_user, known)) == 0.0
    tokens.unknown_rate = 0.0
    assert share_unknown(tokens.train()(vectors, is_user, known)) == 0.0


def test_the_unknown_vector_trains_only_with_a_rate(small_data, sasrec_dir, tmp_path):
    # the collaborative model was trained on these very records: without a rate, no title reads the unknown vector
    plain = unknown_vectors(sft_run(small_data, sasrec_dir, tmp_path / "plain"))
    learned = unknown_vectors(sft_run(small_data, sasrec_dir, tmp_path / "rate", collaborative_unknown_rate=0.3))
    assert plain and all(v.abs().max() == 0 for v in plain.values())
    items = [k for k in learned if ".items." in k]
    assert items and all(learned[k].abs().max() > 0 for k in items)


def test_unseen_history_titles_are_drawn_with_the_seed_and_counted(small_data):
    records = load_split(small_data, "val")
    changed, replaced = with_unseen_history(records, 0.2, seed=1)
    placed = sum(title.startswith(UNSEEN.split("{")[0]) for r in changed for title in r.history)
    assert replaced == placed == sum(round(0.2 * len(r.history)) for r in records) > 0
    assert with_unseen_history(records, 0.2, seed=1)[0] == changed != with_unseen_history(records, 0.2, seed=2)[0]
    assert [(r.candidates, r.target) for r in changed] == [(r.candidates, r.target) for r in records]
