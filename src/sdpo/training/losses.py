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

from sdpo.training.dynamic_po import boundary_negatives, dual_margin_beta


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


def align_losses(logps: torch.Tensor, n_tokens: torch.Tensor, reference: torch.Tensor, align) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-record align losses, and the step's metrics.

    Args:
        logps: [B, 1+K] summed log-probs under the policy, the positive first, then the K negatives.
        n_tokens: [B, 1+K] the answers' token counts.
        reference: [B, 1+K] the same log-probs under the frozen reference (SFT) model.
        align: the loss (sdpo: softmax over the K; dpo: pairwise, averaged over the K), beta, sft_weight, and
            DynamicPO's boundary_negatives and dynamic_beta (`sdpo.training.dynamic_po`).

    Returns:
        [B] losses: the preference loss (over the boundary negatives only, with DynamicPO's selection; with
        its beta per negative) plus sft_weight times the positive's per-token NLL; and the batch means of
        the two terms, the rewards (at the base beta), the log-probs (TRL's names) and DynamicPO's choices.
    """
    chosen, rejected = logps[:, 0], logps[:, 1:]
    ref_chosen, ref_rejected = reference[:, 0], reference[:, 1:]
    beta, metrics = align.beta, {}
    selected, loss_beta = None, beta
    if align.boundary_negatives:
        selected, fallback = boundary_negatives(chosen, rejected)
        metrics |= {"dynamicpo/selected": selected.float().sum(-1).mean().item(), "dynamicpo/fallback": fallback.float().mean().item()}
    if align.dynamic_beta:
        everyone = torch.ones_like(rejected, dtype=torch.bool)
        loss_beta = dual_margin_beta(chosen, rejected, everyone if selected is None else selected, beta, align.dynamic_beta_margin)
        kept = torch.ones_like(loss_beta) if selected is None else selected.to(loss_beta.dtype)
        per_record = (loss_beta * kept).sum(-1) / kept.sum(-1)  # [B]: a mean per record, so every process's share weighs alike
        metrics |= {"dynamicpo/beta": per_record.mean().item()}
    loss_function = softmax_dpo_loss if align.loss == "sdpo" else mean_dpo_loss
    losses = loss_function(chosen, rejected, ref_chosen, ref_rejected, loss_beta, selected)
    nll = chosen_nll(chosen, n_tokens[:, 0])  # logged whatever its weight: it shows the positive's likelihood fall
    metrics |= {"loss/preference": losses.detach().mean().item(), "loss/sft": nll.detach().mean().item()}
    if align.sft_weight:
        losses = losses + align.sft_weight * nll
    chosen_rewards = (beta * (chosen - ref_chosen)).detach()  # [B]
    rejected_rewards = (beta * (rejected - ref_rejected)).detach()  # [B, K]
    metrics |= {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards.mean(-1)).mean().item(),
        "rewards/accuracies": (chosen_rewards[:, None] > rejected_rewards).all(-1).float().mean().item(),
        "logps/chosen": chosen.detach().mean().item(),
        "logps/rejected": rejected.detach().mean().item(),
    }
    return losses, metrics
