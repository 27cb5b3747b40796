"""DPO and variants on summed sequence log-probs (Rafailov et al. 2023, arXiv 2305.18290).

All take (B,) tensors: policy and reference log-probs of the chosen and rejected completions, summed over
completion tokens. With ``h = (logp_c - ref_c) - (logp_r - ref_r)``:

    sigmoid  -(1 - ls) log sigma(beta h) - ls log sigma(-beta h)       (ls > 0: conservative DPO)
    ipo      ((logp_c - ref_c)/|y_c| - (logp_r - ref_r)/|y_r| - 1/(2 beta))^2      (arXiv 2310.12036)
    hinge    max(0, 1 - beta h)                                         (SLiC, arXiv 2305.10425)
    robust   [-(1 - ls) log sigma(beta h) + ls log sigma(-beta h)] / (1 - 2 ls)   (rDPO, arXiv 2403.00409)

Semantics match TRL's DPOTrainer for the same loss type (tests compare against it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lowalign.losses.common import LossOutput


def _sigmoid(h, beta, ls, **_):
    return -(1 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h)


def _hinge(h, beta, ls, **_):
    return torch.relu(1 - beta * h)


def _ipo(h, beta, ls, *, chosen_ratio, rejected_ratio, chosen_lengths, rejected_lengths):
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (per-token averages)")
    d = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
    return (d - 1 / (2 * beta)) ** 2


def _robust(h, beta, ls, **_):
    if not 0.0 <= ls < 0.5:
        raise ValueError("loss_type='robust' needs 0 <= label_smoothing < 0.5")
    return (-(1 - ls) * F.logsigmoid(beta * h) + ls * F.logsigmoid(-beta * h)) / (1 - 2 * ls)


DPO_LOSSES: dict[str, Callable] = {"sigmoid": _sigmoid, "ipo": _ipo, "hinge": _hinge, "robust": _robust}


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> LossOutput:
    """Mean preference loss over the batch and metrics (implicit rewards beta (logp - ref), accuracy, margin).

    Shapes: all (B,); lengths are completion token counts (needed by ``ipo``).
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(DPO_LOSSES)}, got {loss_type!r}")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    per_pair = DPO_LOSSES[loss_type](h, beta, label_smoothing, chosen_ratio=chosen_ratio,
                                     rejected_ratio=rejected_ratio, chosen_lengths=chosen_lengths,
                                     rejected_lengths=rejected_lengths)
    with torch.no_grad():
        rc, rr = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
                   "rewards/accuracy": (rc > rr).float().mean(), "rewards/margin": (rc - rr).mean(),
                   "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}
    return LossOutput(loss=per_pair.mean(), metrics=metrics)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *,
                       margin: torch.Tensor | float = 0.0) -> LossOutput:
    """Reward-model pairwise loss -log sigma(r_c - r_r - margin) (Bradley-Terry; margin as in Llama 2).

    Shapes: (B,) scores from the reward head; margin scalar or (B,).
    """
    d = chosen_scores - rejected_scores
    loss = -F.logsigmoid(d - margin).mean()
    with torch.no_grad():
        metrics = {"accuracy": (d > 0).float().mean(), "margin": d.mean(),
                   "scores/chosen": chosen_scores.mean(), "scores/rejected": rejected_scores.mean()}
    return LossOutput(loss=loss, metrics=metrics)


def multi_objective_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> LossOutput:
    """Multi-attribute reward regression: mean squared error per attribute, averaged with ``weights``
    (multi-objective reward models for GRPO). Shapes: pred, target (B, K); weights (K,)."""
    per_attr = ((pred - target) ** 2).mean(0)  # (K,)
    w = torch.ones_like(per_attr) if weights is None else weights.to(per_attr)
    loss = (per_attr * w).sum() / w.sum()
    with torch.no_grad():
        metrics = {f"mae/{k}": v for k, v in enumerate((pred - target).abs().mean(0))}
    return LossOutput(loss=loss, metrics=metrics)


def within_prompt_ranking_loss(scores: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor) -> LossOutput:
    """Bradley-Terry on every two rated completions of one prompt, ordered by their true scores:
    mean over pairs (i, j) with groups_i = groups_j and t_i > t_j of -log sigma(s_i - s_j). A pointwise
    regression spends itself on offsets between prompts; a group-normalized trainer (GRPO) reads only the
    order within a prompt, which this term teaches. Pairs with equal targets are skipped.

    Shapes: scores, targets (B,) (the weighted reward and the weighted true score); groups (B,) ids.
    Worked example: s [2, 0, 1], t [1, 0, 0], one group -> pairs (0, 1), (0, 2):
    loss = (log(1 + e^-2) + log(1 + e^-1)) / 2 = 0.2200, rank_accuracy 1, rank_pairs 2 (the count).
    """
    same = groups[:, None] == groups[None, :]
    better = (targets[:, None] > targets[None, :]) & same  # (B, B): i ranked above j
    d = scores[:, None] - scores[None, :]
    n = better.sum()
    if n == 0:
        z = scores.sum() * 0.0
        return LossOutput(z, {"rank_accuracy": torch.tensor(float("nan")), "rank_pairs": n})
    loss = -(F.logsigmoid(d) * better).sum() / n
    with torch.no_grad():
        metrics = {"rank_accuracy": ((d > 0) & better).sum() / n, "rank_pairs": n}
    return LossOutput(loss, metrics)
