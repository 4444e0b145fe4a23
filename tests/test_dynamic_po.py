"""DynamicPO's boundary negatives and dual-margin beta against values worked out by hand, then in align runs."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from sdpo.config import build_config
from sdpo.training.dynamic_po import boundary_negatives, dual_margin_beta, top_cluster
from sdpo.training.losses import align_losses, mean_dpo_loss, softmax_dpo_loss
from sdpo.training.preference import LOG_FILE, AlignConfig, run_align
from tests.test_preference import sft_run


def hand_beta(d1, d2, beta=1.0, margin=6.0):
    return beta * (1 + 0.5 * math.tanh((d1 - d2 - margin) / (abs(d1) + abs(d2))))


def test_the_negatives_scored_at_or_above_the_positive_are_the_boundary():
    chosen = torch.tensor([-2.0, -5.0])
    rejected = torch.tensor([[-1.0, -3.0, -2.0], [-1.0, -2.0, -9.0]])
    selected, fallback = boundary_negatives(chosen, rejected)
    assert selected.tolist() == [[True, False, True], [True, True, False]]  # a tie counts (>=)
    assert fallback.tolist() == [False, False]


def test_a_record_with_no_violator_takes_the_top_cluster_of_three():
    # clusters {-1, -1.2}, {-5}, {-9, -9.5, -10}: the top one is the two near the positive
    selected, fallback = boundary_negatives(torch.tensor([0.0]), torch.tensor([[-9.0, -1.2, -5.0, -10.0, -1.0, -9.5]]))
    assert selected.tolist() == [[False, True, False, False, True, False]]
    assert fallback.tolist() == [True]


@pytest.mark.parametrize("values, expected", [
    ([-3.0], [True]),  # one negative: itself
    ([-3.0, -3.0, -3.0], [True, True, True]),  # all equal: one cluster
    ([-1.0, -7.0], [True, False]),  # two values, two clusters
    ([-1.0, -1.3, -5.0, -9.0], [True, True, False, False]),  # 4 values, 3 clusters: {-1, -1.3}, {-5}, {-9}
])
def test_top_cluster_edge_cases(values, expected):
    assert top_cluster(torch.tensor(values)).tolist() == expected


def test_dual_margin_beta_by_hand():
    """One violator: d1 = -2 - (-1) = -1; the easy ones' mean is -4, so d2 = -1 - (-4) = 3."""
    chosen, rejected = torch.tensor([-2.0]), torch.tensor([[-1.0, -3.0, -5.0]])
    selected, _ = boundary_negatives(chosen, rejected)
    beta = dual_margin_beta(chosen, rejected, selected, beta=0.5)
    assert beta[0, 0].item() == pytest.approx(hand_beta(-1.0, 3.0, beta=0.5), abs=1e-6)
    assert beta[0, 0].item() == pytest.approx(0.5 * (1 + 0.5 * math.tanh(-2.5)), abs=1e-6)


def test_dual_margin_beta_when_every_negative_violates_uses_their_own_mean():
    chosen, rejected = torch.tensor([-5.0]), torch.tensor([[-1.0, -2.0]])
    selected, _ = boundary_negatives(chosen, rejected)
    assert selected.all()
    beta = dual_margin_beta(chosen, rejected, selected, beta=1.0)
    assert beta[0].tolist() == pytest.approx([hand_beta(-4.0, 0.5), hand_beta(-3.0, -0.5)], abs=1e-6)


def test_dual_margin_beta_stays_within_half_and_1_38_times_beta():
    """0.5 beta is the bound tanh reaches in float32 when the boundary is far violated."""
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(64, generator=g) * 5, torch.randn(64, 15, generator=g) * 5
    selected, _ = boundary_negatives(chosen, rejected)
    beta = dual_margin_beta(chosen, rejected, selected, beta=2.0)[selected]
    assert beta.min() >= 1.0 and beta.max() < 2.0 * (1 + 0.5 * math.tanh(1)) + 1e-6


def test_selected_losses_by_hand_and_no_gradient_to_the_others():
    """Policy -2 | -1, -3, -5 against reference -2 | -2, -2, -2: only the first negative is on the boundary, h = 0 | 1, -1, -3."""
    chosen = torch.tensor([-2.0], requires_grad=True)
    rejected = torch.tensor([[-1.0, -3.0, -5.0]], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-2.0]), torch.tensor([[-2.0, -2.0, -2.0]])
    selected, _ = boundary_negatives(chosen, rejected)
    beta = dual_margin_beta(chosen, rejected, selected, beta=1.0)
    b0 = hand_beta(-1.0, 3.0)
    sdpo = softmax_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, selected)
    assert sdpo.item() == pytest.approx(math.log1p(math.exp(b0 * 1.0)), abs=1e-6)
    sdpo.sum().backward()
    assert rejected.grad[0, 1:].tolist() == [0.0, 0.0] and rejected.grad[0, 0] > 0
    dpo = mean_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, selected)
    assert dpo.item() == pytest.approx(math.log1p(math.exp(b0 * 1.0)), abs=1e-6)  # -log sigmoid(b0 * (0 - 1))
    plain = softmax_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 1.0)
    assert plain.item() == pytest.approx(math.log1p(math.exp(1.0) + math.exp(-1.0) + math.exp(-3.0)), abs=1e-6)


def test_mean_dpo_averages_over_the_selected_negatives_only():
    chosen, rejected = torch.tensor([0.0]), torch.tensor([[1.0, 2.0, -4.0]])
    zeros_c, zeros_r = torch.zeros(1), torch.zeros(1, 3)
    selected = torch.tensor([[True, True, False]])
    got = mean_dpo_loss(chosen, rejected, zeros_c, zeros_r, 1.0, selected).item()
    assert got == pytest.approx((math.log1p(math.exp(1.0)) + math.log1p(math.exp(2.0))) / 2, abs=1e-6)
    assert mean_dpo_loss(chosen, rejected, zeros_c, zeros_r, 1.0).item() == pytest.approx(
        (math.log1p(math.exp(1.0)) + math.log1p(math.exp(2.0)) + math.log1p(math.exp(-4.0))) / 3, abs=1e-6)


@pytest.mark.parametrize("loss", ["sdpo", "dpo"])
def test_align_losses_with_both_remedies_log_what_they_chose(loss):
    align = SimpleNamespace(loss=loss, beta=1.0, sft_weight=0.0, boundary_negatives=True, dynamic_beta=True, dynamic_beta_margin=6.0)
    logps = torch.tensor([[-2.0, -1.0, -3.0, -5.0], [0.0, -9.0, -1.2, -5.0]])
    reference = torch.tensor([[-2.0, -2.0, -2.0, -2.0], [0.0, -9.0, -1.2, -5.0]])
    losses, metrics = align_losses(logps, torch.ones(2, 4), reference, align)
    b0 = hand_beta(-1.0, 3.0)
    # record 2: no violator, its top cluster is {-1.2} alone; all its rewards are 0, so its loss is log 2 for either loss
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(b0)), math.log(2.0)], abs=1e-6)
    assert metrics["dynamicpo/selected"] == pytest.approx(1.0) and metrics["dynamicpo/fallback"] == pytest.approx(0.5)
    # record 2: d1 = 0 - (-1.2) = 1.2, d2 = -1.2 - mean(-9, -5) = 5.8
    assert metrics["dynamicpo/beta"] == pytest.approx((b0 + hand_beta(1.2, 5.8)) / 2, abs=1e-6)


@pytest.mark.parametrize("loss", ["sdpo", "dpo"])
def test_align_runs_with_dynamicpo_on_text_and_collaborative_prompts(small_data, sasrec_dir, tmp_path, loss):
    for name, settings in (("text", {}), ("collab", {"collaborative": str(sasrec_dir), "collaborative_score": True})):
        sft_dir = sft_run(small_data, tmp_path / f"sft-{name}", lora_dropout=0.0, bf16=False, **settings)
        out = run_align(build_config(AlignConfig, {
            "sft": str(sft_dir), "output_dir": str(tmp_path / f"{name}-{loss}"), "loss": loss, "negatives": 5, "max_steps": 2,
            "per_device_train_batch_size": 4, "logging_steps": 1, "disable_tqdm": True, "train_limit": 8, "bf16": False,
            "learning_rate": 1e-2, "boundary_negatives": True, "dynamic_beta": True,
        }))
        logged = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines() if '"loss"' in line]
        assert len(logged) == 2
        for entry in logged:
            assert 1.0 <= entry["dynamicpo/selected"] <= 5.0 and 0.5 < entry["dynamicpo/beta"] < 1.39
            assert math.isfinite(entry["loss"])
