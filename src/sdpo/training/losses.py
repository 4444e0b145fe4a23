"""Preference losses for recommendation: Softmax-DPO (S-DPO), with DPO as its K = 1 case.

S-DPO (Chen et al., "On Softmax Direct Preference Optimization for Recommendation",
NeurIPS 2024, eq. 9): for a prompt x, the positive item e_p and K negatives e_1..e_K, with
implicit rewards r(e) = beta * (log pi(e|x) - log pi_ref(e|x)),

    L = -log sigmoid( -log sum_k exp( r(e_k) - r(e_p) ) )
      = softplus( logsumexp_k ( r(e_k) - r(e_p) ) )

computed with logsumexp and softplus, so it stays finite for any reward gap (the published
code sums exponentials and overflows). With K = 1 it is DPO: softplus(r(e_1) - r(e_p)) =
-log sigmoid(r(e_p) - r(e_1)).

The preference loss only moves rewards apart: it can push the positive's likelihood down with
the negatives', until generation names no candidate. An optional SFT term holds it up: the
per-token NLL of the positive, weighted by alpha and added to the preference loss, as in RPO
(Pang et al., arXiv 2404.19733):

    L_total = L + alpha * ( -log pi(e_p|x) / |e_p| )
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-record S-DPO loss.

    Args:
        policy_chosen_logps: [B] summed log-prob of the positive answer under the policy.
        policy_rejected_logps: [B, K] summed log-probs of the K negatives under the policy.
        reference_chosen_logps: [B] the same under the frozen reference (SFT) model.
        reference_rejected_logps: [B, K] the same under the reference.
        beta: temperature of the implicit reward; a float, or [B, K] one per negative (DynamicPO).
        selected: [B, K] bool, the negatives that enter the sum (at least one per record); None: all.

    Returns:
        [B] losses: softplus(logsumexp_k(beta * ((pi_k - ref_k) - (pi_pos - ref_pos)))) over the selected k.
    """
    if policy_rejected_logps.dim() != 2 or policy_rejected_logps.shape != reference_rejected_logps.shape:
        raise ValueError(f"rejected log-probs must both be [B, K]; got {tuple(policy_rejected_logps.shape)} and {tuple(reference_rejected_logps.shape)}")
    chosen_rewards = policy_chosen_logps - reference_chosen_logps  # [B]
    rejected_rewards = policy_rejected_logps - reference_rejected_logps  # [B, K]
    gaps = beta * (rejected_rewards - chosen_rewards[:, None])  # [B, K]
    if selected is not None:
        gaps = gaps.masked_fill(~selected, float("-inf"))  # no gradient reaches a negative left out
    return F.softplus(torch.logsumexp(gaps, dim=-1))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
) -> torch.Tensor:
    """Per-record DPO loss (Rafailov et al., 2023): all inputs [B]; -log sigmoid(beta * margin)."""
    margin = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * margin)


def mean_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-record DPO against each of K negatives, averaged over the selected ones.

    Args: as `softmax_dpo_loss` (chosen [B], rejected [B, K], beta a float or [B, K], selected [B, K] bool or None).

    Returns:
        [B] losses: mean over the selected k of -log sigmoid(beta * ((pi_pos - ref_pos) - (pi_k - ref_k))).
    """
    k = policy_rejected_logps.shape[1]
    pairs = dpo_loss(policy_chosen_logps[:, None].expand(-1, k), policy_rejected_logps,
                     reference_chosen_logps[:, None].expand(-1, k), reference_rejected_logps, beta)  # [B, K]
    if selected is None:
        return pairs.mean(dim=-1)
    return (pairs * selected).sum(dim=-1) / selected.sum(dim=-1)


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-record NLL of the positive answer per token, RPO's SFT term.

    Args:
        policy_chosen_logps: [B] summed log-prob of the positive answer under the policy.
        chosen_tokens: [B] its number of answer tokens (at least 1).

    Returns:
        [B] -policy_chosen_logps / chosen_tokens.
    """
    if policy_chosen_logps.shape != chosen_tokens.shape:
        raise ValueError(f"log-probs and token counts must both be [B]; got {tuple(policy_chosen_logps.shape)} and {tuple(chosen_tokens.shape)}")
    return -policy_chosen_logps / chosen_tokens.to(policy_chosen_logps.dtype)
