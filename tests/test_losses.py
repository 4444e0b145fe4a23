"""S-DPO and DPO losses against slow, obvious formulas."""

import math

import pytest
import torch

from sdpo.training.losses import dpo_loss, softmax_dpo_loss


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
