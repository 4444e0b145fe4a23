"""DynamicPO (arXiv 2605.00327; code: xingyuHuxingyu/DynamicPO): which negatives a step trains on, and with which beta.

With many negatives, a multi-negative loss is dominated by the easy ones, and the few near the
decision boundary are under-trained ("preference optimization collapse"). DynamicPO answers with
two remedies, both computed per record from the policy's own summed log-probs of the step, with
no gradient through them:

1. **Boundary negatives** (`boundary_negatives`): the negatives the policy scores at or above the
   positive, log pi(e_k|x) >= log pi(e_p|x). Where there is none, the highest-scoring cluster of a
   1-D k-means (3 clusters) over the K log-probs. Only these enter the loss; the rest get no gradient.
2. **Dual-margin beta** (`dual_margin_beta`): per selected negative j, with p = the policy's log-probs,

       d1 = p_p - p_j                      (positive to this boundary negative)
       d2 = p_j - mean_{k not selected} p_k  (this boundary negative to the easy ones; all selected: their mean)
       beta_j = beta * (1 + 0.5 * tanh((d1 - d2 - m) / (|d1| + |d2|)))     m = 6 (the authors' current code)

   so beta_j lies in (0.5 beta, 1.38 beta): lower where the boundary is ambiguous or violated.

S-DPO then takes softplus(logsumexp_{j selected} beta_j (h_j - h_p)) with h = log pi - log pi_ref,
and DPO the mean over the selected j of -log sigmoid(beta_j (h_p - h_j)) (the authors ship DMPO,
MPPO and S-DPO; the pairwise mean is its plain extension).

Where this differs from the authors' code: their k-means is sklearn's (k-means++ seeded 42); ours
starts at the values' quantiles and is exact and deterministic in 1-D for well-separated values,
so on near-even spreads the two may cut the top cluster differently. Their beta has no guard
against an exact tie (0/0); ours adds 1e-8 to the denominator.
"""

from __future__ import annotations

import torch

CLUSTERS = 3
MARGIN = 6.0
TIE_GUARD = 1e-8


def top_cluster(values: torch.Tensor, clusters: int = CLUSTERS, iterations: int = 100) -> torch.Tensor:
    """[K] bool: the members of the highest cluster of a 1-D k-means over `values` [K] (Lloyd, started at quantiles).

    In 1-D the clusters are intervals, so the highest cluster is the one holding the highest value.
    Fewer than 2 clusters possible (K < 2, or all values equal): every value.
    """
    clusters = min(clusters, values.numel())
    if clusters < 2 or values.max() == values.min():
        return torch.ones_like(values, dtype=torch.bool)
    values = values.double()
    centres = torch.quantile(values, (torch.arange(clusters, dtype=torch.double) + 0.5) / clusters)
    for _ in range(iterations):
        assignment = (values[:, None] - centres[None, :]).abs().argmin(dim=1)  # [K]
        moved = torch.stack([values[assignment == c].mean() if (assignment == c).any() else centres[c] for c in range(clusters)])
        if torch.equal(moved, centres):
            break
        centres = moved
    return assignment == assignment[values.argmax()]


@torch.no_grad()
def boundary_negatives(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The negatives each record trains on.

    Args:
        policy_chosen_logps: [B] the policy's summed log-prob of the positive.
        policy_rejected_logps: [B, K] the same of the K negatives.

    Returns:
        [B, K] bool, True where a negative scores at least the positive, or (a record with none)
        where it is in the top 1-D k-means cluster; and [B] bool, True where a record fell back to k-means.
    """
    selected = policy_rejected_logps >= policy_chosen_logps[:, None]
    fallback = ~selected.any(dim=1)
    for row in fallback.nonzero().flatten().tolist():
        selected[row] = top_cluster(policy_rejected_logps[row].detach().cpu()).to(selected.device)
    return selected, fallback


@torch.no_grad()
def dual_margin_beta(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, selected: torch.Tensor,
                     beta: float, margin: float = MARGIN) -> torch.Tensor:
    """[B, K] beta per negative (module docstring); meaningful where `selected` [B, K] is True.

    Args:
        policy_chosen_logps: [B]; policy_rejected_logps: [B, K]: the policy's summed log-probs.
        selected: [B, K] the boundary negatives (`boundary_negatives`).
        beta: the base beta; margin: m.
    """
    chosen, rejected = policy_chosen_logps.float()[:, None], policy_rejected_logps.float()  # [B, 1], [B, K]
    easy = ~selected
    easy = torch.where(easy.any(dim=1, keepdim=True), easy, selected)  # every negative selected: the selected ones' mean
    easy_mean = (rejected * easy).sum(dim=1, keepdim=True) / easy.sum(dim=1, keepdim=True)  # [B, 1]
    d1 = chosen - rejected
    d2 = rejected - easy_mean
    return beta * (1 + 0.5 * torch.tanh((d1 - d2 - margin) / (d1.abs() + d2.abs() + TIE_GUARD)))
