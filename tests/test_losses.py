"""S-DPO and DPO losses against slow, obvious formulas."""

import math
from types import SimpleNamespace

import pytest
import torch

from sdpo.training.losses import align_losses, chosen_nll, dpo_loss, softmax_dpo_loss


def brute_force_sdpo(pc, pr, rc, rr, beta):
    """log(1 + sum_k exp(beta * ((pr_k - rr_k) - (pc - rc)))) with Python floats, record by record."""
    out = []
    for b in range(len(pc)):
        total = sum(math.exp(beta * ((pr[b][k] - rr[b][k]) - (pc[b] - rc[b]))) for k in range(len(pr[b])))
        out.append(math.log1p(total))
    return out


def random_inputs(seed, batch, k, scale):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, generator=g, dtype=torch.float64) * scale,
        torch.randn(batch, k, generator=g, dtype=torch.float64) * scale,
        torch.randn(batch, generator=g, dtype=torch.float64) * scale,
        torch.randn(batch, k, generator=g, dtype=torch.float64) * scale,
    )


@pytest.mark.parametrize("k", [1, 3, 15])
@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_matches_brute_force(k, beta):
    pc, pr, rc, rr = random_inputs(k, 6, k, 3.0)
    got = softmax_dpo_loss(pc, pr, rc, rr, beta)
    expected = brute_force_sdpo(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta)
    assert got.shape == (6,)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_extreme_gaps_stay_finite(gap):
    pc = torch.zeros(2, requires_grad=True)
    pr = torch.full((2, 3), gap, requires_grad=True)
    zeros_c, zeros_r = torch.zeros(2), torch.zeros(2, 3)
    loss = softmax_dpo_loss(pc, pr, zeros_c, zeros_r, beta=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    if gap > 0:  # log(1 + 3 e^gap) = gap + log 3 (+ tiny)
        assert loss[0].item() == pytest.approx(gap + math.log(3), rel=1e-6)
        assert pc.grad[0].item() == pytest.approx(-1.0, abs=1e-4)
    else:
        assert loss[0].item() == pytest.approx(0.0, abs=1e-30)


def test_k1_is_dpo():
    pc, pr, rc, rr = random_inputs(7, 64, 1, 5.0)
    for beta in (0.1, 1.0, 3.0):
        sdpo = softmax_dpo_loss(pc, pr, rc, rr, beta)
        dpo = dpo_loss(pc, pr[:, 0], rc, rr[:, 0], beta)
        assert (sdpo - dpo).abs().max().item() <= 1e-6


def test_gradient_raises_the_positive_against_the_negatives():
    """One gradient step on the loss moves log pi(positive) up relative to the negatives."""
    logits = torch.zeros(1, 5, requires_grad=True)  # a toy policy over 5 items: 0 positive, 1..4 negatives
    reference = torch.log_softmax(torch.zeros(1, 5), -1)
    before = torch.log_softmax(logits, -1).detach()
    logps = torch.log_softmax(logits, -1)
    loss = softmax_dpo_loss(logps[:, 0], logps[:, 1:4], reference[:, 0], reference[:, 1:4], beta=1.0).sum()
    loss.backward()
    with torch.no_grad():
        after = torch.log_softmax(logits - 0.5 * logits.grad, -1)
    margin_before = before[0, 0] - before[0, 1:4].max()
    margin_after = after[0, 0] - after[0, 1:4].max()
    assert margin_after > margin_before
    assert after[0, 4] - before[0, 4] < after[0, 0] - before[0, 0]  # an unused negative rises less than the positive


def test_shape_checks():
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        softmax_dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 1.0)


def test_chosen_nll_is_the_positives_nll_per_token():
    assert chosen_nll(torch.tensor([-6.0, -1.5]), torch.tensor([3, 1])).tolist() == [2.0, 1.5]
    with pytest.raises(ValueError, match=r"\[B\]"):
        chosen_nll(torch.zeros(2), torch.ones(2, 1))


# One record, K = 2: policy log-probs (positive first) -2, -3, -5 over 4, 2 and 3 answer tokens; reference -2.5, -2, -5.
# Rewards (beta 1): positive 0.5, negatives -1 and 0. S-DPO = log(1 + e^-1.5 + e^-0.5) = 0.604131;
# DPO = (log(1 + e^-1.5) + log(1 + e^-0.5)) / 2 = 0.337745; the positive's NLL per token = 2 / 4 = 0.5.
@pytest.mark.parametrize("loss, preference", [("sdpo", 0.6041306053), ("dpo", 0.3377451311)])
@pytest.mark.parametrize("sft_weight", [0.0, 0.1, 1.0])
def test_align_losses_add_alpha_times_the_positives_nll_to_the_hand_computed_preference_loss(loss, preference, sft_weight):
    align = SimpleNamespace(loss=loss, beta=1.0, sft_weight=sft_weight, boundary_negatives=False, dynamic_beta=False)
    logps, reference = torch.tensor([[-2.0, -3.0, -5.0]]), torch.tensor([[-2.5, -2.0, -5.0]])
    losses, metrics = align_losses(logps, torch.tensor([[4, 2, 3]]), reference, align)
    assert losses.tolist() == pytest.approx([preference + sft_weight * 0.5], abs=1e-6)
    assert metrics["loss/preference"] == pytest.approx(preference, abs=1e-6)
    assert metrics["loss/sft"] == pytest.approx(0.5)  # logged at every weight, 0 included
    assert metrics["rewards/chosen"] == pytest.approx(0.5) and metrics["rewards/margins"] == pytest.approx(1.0)


def test_the_sft_term_adds_alpha_over_the_answer_length_to_the_pull_on_the_positive():
    """The preference term's pull on the positive fades as its margin grows; the SFT term's stays alpha / |e_p|."""
    def positive_gradient(sft_weight):
        logps = torch.tensor([[-2.0, -3.0]], requires_grad=True)
        losses, _ = align_losses(logps, torch.tensor([[2, 2]]), torch.tensor([[-1.0, -1.0]]), SimpleNamespace(loss="sdpo", beta=1.0, sft_weight=sft_weight,
                                                                                                     boundary_negatives=False, dynamic_beta=False))
        losses.sum().backward()
        return logps.grad[0, 0].item()

    assert -0.5 < positive_gradient(0.0) < 0  # sigmoid(-margin) = 0.27 here
    assert positive_gradient(1.0) == pytest.approx(positive_gradient(0.0) - 0.5)  # d(alpha * -logp / 2) = -alpha / 2
