"""GRPO advantages and the clipped-surrogate loss with its aggregation variants.

Shapes: ``B`` sequences (``B = prompts x group_size``, groups contiguous), ``T`` completion tokens.
Semantics follow TRL's ``GRPOTrainer`` for the same settings (checked in tests/losses against TRL).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lowalign.kernels.logprobs import kl_from_logps
from lowalign.losses.common import LossOutput, bessel_std, masked_mean

# ---- advantages ----------------------------------------------------------------------------------


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                    leave_one_out: bool = False) -> torch.Tensor:
    """Group-relative advantages (DeepSeekMath GRPO, arXiv 2402.03300; RLOO baseline, arXiv 2402.14740).

        baseline_i = mean of the group              (leave_one_out: mean of the *other* G - 1 members)
        A_i        = (r_i - baseline_i) / (std + 1e-4)   scale="group": Bessel std of the group
                                                          scale="batch": Bessel std of the whole batch
                                                          scale="none":  no division (Dr. GRPO)

    Args:
        rewards: (B,) with B a multiple of ``group_size``; groups are contiguous.
    Returns:
        (B,) float32 advantages.

    Worked example: rewards [1, 0, 0, 1] with G=2 -> group means [.5, .5], Bessel std .7071 each,
    A = [.5, -.5, -.5, .5] / .7072 = [.7070, -.7070, -.7070, .7070].
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    r = rewards.float()
    if r.ndim != 1 or r.numel() % group_size:
        raise ValueError(f"rewards must be (B,) with B a multiple of group_size={group_size}, got {tuple(r.shape)}")
    g = r.view(-1, group_size)  # (P, G)
    if leave_one_out:
        if group_size < 2:
            raise ValueError("leave_one_out needs group_size >= 2")
        baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    else:
        baseline = g.mean(1, keepdim=True)
    adv = (g - baseline).view(-1)
    if scale == "group":
        std = bessel_std(g, dim=1) if group_size > 1 else torch.zeros(g.shape[0])
        adv = adv / (std.repeat_interleave(group_size) + 1e-4)
    elif scale == "batch":
        std = bessel_std(r) if r.numel() > 1 else torch.zeros(())
        adv = adv / (std + 1e-4)
    return adv


# ---- aggregations: per-token loss (B, T) -> scalar ------------------------------------------------


def _agg_grpo(per_token, mask, *, max_completion_length, num_items):
    """Per-sequence token mean, then mean over sequences (original GRPO)."""
    return masked_mean(per_token, mask, dim=-1).mean()


def _agg_bnpo(per_token, mask, *, max_completion_length, num_items):
    """Sum over all tokens / number of unmasked tokens in this batch."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def _agg_dr_grpo(per_token, mask, *, max_completion_length, num_items):
    """Dr. GRPO (arXiv 2503.20783): sum over tokens / (B x max_completion_length): no length bias."""
    if max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)


def _agg_dapo(per_token, mask, *, max_completion_length, num_items):
    """DAPO (arXiv 2503.14476): sum over tokens / tokens of the *whole generation batch* (``num_items``,
    defaults to this batch's count) so micro-batches add up to a global token-level mean."""
    denom = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token.dtype)
    return (per_token * mask).sum() / denom.clamp(min=1.0)


AGGREGATIONS: dict[str, Callable] = {
    "grpo": _agg_grpo,
    "bnpo": _agg_bnpo,
    "dr_grpo": _agg_dr_grpo,
    "dapo": _agg_dapo,
}


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, loss_type: str = "grpo", max_completion_length: int | None = None,
              kl_estimator: str = "k3", entropy: torch.Tensor | None = None,
              num_items: float | None = None) -> LossOutput:
    """Clipped surrogate with optional KL penalty to the reference (PPO/GRPO, DAPO's asymmetric clip).

        ratio_t   = exp(logp_t - old_t)
        loss_t    = -min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A) + beta kl_t
        kl_t      = k3: exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (to the adapter-off reference)
        loss      = AGGREGATIONS[loss_type](loss_t, mask)

    Args:
        logps, old_logps, mask: (B, T); ref_logps: (B, T) when beta > 0; advantages: (B,) or (B, T).
        entropy: optional (B, T) per-token entropy, only logged.
        num_items: DAPO's global token count across micro-batches.
    Returns:
        LossOutput(loss, metrics: kl, clip_ratio/{low,high,region}, ratio_mean, entropy).
    """
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"loss_type must be one of {sorted(AGGREGATIONS)}, got {loss_type!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps")
    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages  # (B, 1) or (B, T)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics = {}
    if beta != 0.0:
        kl = kl_from_logps(logps, ref_logps, kl_estimator)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    loss = AGGREGATIONS[loss_type](per_token, mask, max_completion_length=max_completion_length,
                                   num_items=num_items)
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        metrics["clip_ratio/low"] = masked_mean(low.float(), mask)
        metrics["clip_ratio/high"] = masked_mean(high.float(), mask)
        metrics["clip_ratio/region"] = masked_mean((low | high).float(), mask)
        metrics["ratio_mean"] = masked_mean(ratio, mask)
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return LossOutput(loss=loss, metrics=metrics)
