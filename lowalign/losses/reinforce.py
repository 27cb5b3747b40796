"""Critic-free advantage estimators of the REINFORCE family, pure functions on tensors.

    remax           A_i = r_i - r(greedy completion of prompt(i))               (Li et al. 2023, arXiv 2310.10505)
    reinforce_pp    per-token rewards r_t = -kl_coef kl_t (+ score on the last token), returns-to-go
                    G_t = sum_{s >= t} r_s, whitened over every valid token of the global batch
                    (Hu 2025, REINFORCE++, arXiv 2501.03262); ``group_baseline`` first subtracts the mean
                    score of each prompt's group (REINFORCE++-baseline)

Both feed the clipped surrogate of ``grpo_loss`` (per-sequence (B,) or per-token (B, T) advantages).
"""

from __future__ import annotations

import torch

from lowalign.losses.ppo import kl_shaped_rewards, whiten


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """ReMax: the greedy completion's reward is the baseline of every sample of the same prompt.

    Args:
        rewards: (P * G,) rewards of the sampled completions, groups of ``group_size`` contiguous per prompt.
        greedy_rewards: (P,) reward of each prompt's greedy completion.
    Returns:
        (P * G,) float32 advantages.

    Worked example: rewards [1, 0, 1, 1], G = 2, greedy [0, 1] -> [1, 0, 0, 0].
    """
    r = rewards.float()
    if r.ndim != 1 or r.numel() != greedy_rewards.numel() * group_size:
        raise ValueError(f"rewards must be (P * G,) = ({greedy_rewards.numel()} * {group_size},), got "
                         f"{tuple(r.shape)}")
    return r - greedy_rewards.float().to(r.device).repeat_interleave(group_size)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{s >= t} r_s over each row's valid tokens (gamma = 1); 0 where mask is 0. Shapes (B, T)."""
    m = mask.to(rewards.dtype)
    r = rewards * m
    return torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1]) * m


def reinforce_pp_advantages(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                            mask: torch.Tensor, *, kl_coef: float, kl_estimator: str = "k2",
                            group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ token advantages.

        s_i  = score_i  (- mean of the prompt's group when ``group_size`` is given: the -baseline variant)
        r_t  = -kl_coef kl_t + s_i 1[t = last token]       kl_t: k1 = logp - ref, k2 = (logp - ref)^2 / 2
        G_t  = sum_{s >= t} r_s
        A_t  = (G_t - mean(G)) / std(G)                    mean / std over every valid token of the batch

    Args:
        scores: (B,) sequence rewards; logps, ref_logps, mask: (B, T) (the rollout policy's log-probs).
    Returns:
        (advantages (B, T), kl (B, T)), 0 where mask is 0.
    """
    s = scores.float()
    if group_size is not None:
        g = s.view(-1, group_size)
        s = (g - g.mean(1, keepdim=True)).reshape(-1)
    rewards, kl = kl_shaped_rewards(s, logps, ref_logps, mask, kl_coef, kl_estimator)
    m = mask.float()
    return whiten(returns_to_go(rewards, m), m) * m, kl
