"""Preference losses for recommendation: Softmax-DPO (S-DPO), with DPO as its K = 1 case.

S-DPO (Chen et al., "On Softmax Direct Preference Optimization for Recommendation",
NeurIPS 2024, eq. 9): for a prompt x, the positive item e_p and K negatives e_1..e_K, with
implicit rewards r(e) = beta * (log pi(e|x) - log pi_ref(e|x)),

    L = -log sigmoid( -log sum_k exp( r(e_k) - r(e_p) ) )
      = softplus( logsumexp_k ( r(e_k) - r(e_p) ) )

computed with logsumexp and softplus, so it stays finite for any reward gap (the published
code sums exponentials and overflows). With K = 1 it is DPO: softplus(r(e_1) - r(e_p)) =
-log sigmoid(r(e_p) - r(e_1)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-record S-DPO loss.

    Args:
        policy_chosen_logps: [B] summed log-prob of the positive answer under the policy.
        policy_rejected_logps: [B, K] summed log-probs of the K negatives under the policy.
        reference_chosen_logps: [B] the same under the frozen reference (SFT) model.
        reference_rejected_logps: [B, K] the same under the reference.
        beta: temperature of the implicit reward.

    Returns:
        [B] losses: softplus(logsumexp_k(beta * ((pi_k - ref_k) - (pi_pos - ref_pos)))).
    """
    if policy_rejected_logps.dim() != 2 or policy_rejected_logps.shape != reference_rejected_logps.shape:
        raise ValueError(f"rejected log-probs must both be [B, K]; got {tuple(policy_rejected_logps.shape)} and {tuple(reference_rejected_logps.shape)}")
    chosen_rewards = policy_chosen_logps - reference_chosen_logps  # [B]
    rejected_rewards = policy_rejected_logps - reference_rejected_logps  # [B, K]
    gaps = beta * (rejected_rewards - chosen_rewards[:, None])  # [B, K]
    return F.softplus(torch.logsumexp(gaps, dim=-1))


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-record DPO loss (Rafailov et al., 2023): all inputs [B]; -log sigmoid(beta * margin)."""
    margin = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * margin)
