"""Reward-filtered fine-tuning: which samples to keep, and the supervised loss on the kept ones.

    best_of_n_mask      keep the ``keep`` highest-reward samples of each prompt's group, optionally only
                        those scoring at least ``min_reward`` (RAFT, Dong et al. 2023, arXiv 2304.06767;
                        best-of-N sampling)
    filtered_sft_loss   token-mean NLL of the kept completions, plus ``kl_coef`` times a per-token
                        KL(policy || reference) estimate on the same tokens (0 for RAFT; SuperHF's KL prior,
                        Mukobi et al. 2023, arXiv 2310.16763)
    policy_filter_mask  PF-PPO's filters: per prompt, the best sample (best_of_n), the best and one other at
                        random (best_random), or the best and the worst (best_worst) of N, kept for the PPO
                        update (Shen and Zhang 2024, "Policy Filtration in RLHF to Fine-Tune LLM for Code
                        Generation", arXiv 2409.06957)
    r_squared           squared Pearson correlation: the R^2 of the best linear fit of one score by another
                        (PF-PPO's measure of how far a learned reward can be trusted)
"""

from __future__ import annotations

import torch

from lowalign.kernels.logprobs import kl_from_logps
from lowalign.losses.common import LossOutput, masked_mean


def best_of_n_mask(rewards: torch.Tensor, group_size: int, keep: int = 1,
                   min_reward: float | None = None) -> torch.Tensor:
    """Per prompt group, the ``keep`` samples with the highest reward (ties: the earlier sample), and of those
    only the ones with ``reward >= min_reward`` when a threshold is given.

    Args:
        rewards: (P * G,) rewards, groups of ``group_size`` contiguous per prompt.
    Returns:
        (P * G,) bool mask of the kept samples.

    Worked example: rewards [0.2, 0.9, 0.5, 0.5], G = 2, keep = 1 -> [F, T, T, F];
    with min_reward = 0.6 -> [F, T, F, F].
    """
    r = rewards.float()
    if r.ndim != 1 or r.numel() % group_size:
        raise ValueError(f"rewards must be (P * G,) with G = group_size = {group_size}, got {tuple(r.shape)}")
    if not 1 <= keep <= group_size:
        raise ValueError(f"keep must be in [1, group_size={group_size}], got {keep}")
    g = r.view(-1, group_size)
    # a stable descending sort keeps the earlier sample first among equal rewards
    order = torch.sort(g, dim=1, descending=True, stable=True).indices[:, :keep]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(1, order, True).view(-1)
    if min_reward is not None:
        mask &= r >= min_reward
    return mask


def filtered_sft_loss(logps: torch.Tensor, mask: torch.Tensor, ref_logps: torch.Tensor | None = None,
                      kl_coef: float = 0.0, kl_estimator: str = "k3") -> LossOutput:
    """Supervised loss on reward-filtered completions.

        L = -mean_t log pi(y_t | x, y_<t)  +  kl_coef * mean_t kl_t        means over every kept token

    ``kl_t`` is Schulman's k1/k2/k3 estimate of KL(pi || ref) at the token (the completions were sampled
    from the policy, so it is an estimate of the policy's KL to the reference along its own samples).

    Args:
        logps: (B, T) policy log-probs of the kept completions' tokens; mask: (B, T) 1 on real tokens;
        ref_logps: (B, T) reference log-probs (needed when kl_coef > 0).
    Returns:
        LossOutput with metrics ``nll`` and ``kl`` (0 when no reference is given).

    Worked example: logps [[-1, -3]], mask [[1, 1]], ref [[-1, -1]], kl_coef 0.5, k1
    -> nll 2, kl mean(0, -2) = -1, loss 2 + 0.5 * -1 = 1.5.
    """
    m = mask.to(logps.dtype)
    nll = -masked_mean(logps, m)
    if ref_logps is None:
        if kl_coef:
            raise ValueError("kl_coef > 0 needs ref_logps")
        return LossOutput(nll, {"nll": nll.detach(), "kl": torch.zeros(())})
    kl = masked_mean(kl_from_logps(logps, ref_logps.detach(), kl_estimator), m)
    return LossOutput(nll + kl_coef * kl, {"nll": nll.detach(), "kl": kl.detach()})


PF_FILTERS = ("best_of_n", "best_random", "best_worst")


def policy_filter_mask(rewards: torch.Tensor, group_size: int, mode: str, noise: torch.Tensor) -> torch.Tensor:
    """PF-PPO's sample filter: which of each prompt's ``group_size`` samples the PPO update keeps.

        best_of_n    the highest reward (ties: the earlier sample)                   1 per prompt
        best_random  the highest, and the other sample with the largest ``noise``    2 per prompt
        best_worst   the highest, and the lowest (ties: the later sample)            2 per prompt

    Args:
        rewards: (P * G,) rewards, groups of ``group_size`` contiguous per prompt.
        noise: (P * G,) numbers that pick best_random's second sample (uniforms drawn from the step's seed for
            the whole batch, so the choice does not depend on how the batch is split over processes).
    Returns:
        (P * G,) bool mask of the kept samples.

    Worked example: rewards [0.2, 0.9, 0.5, | 1, 0, 0], G = 3, noise [.1, .2, .3, | .9, .5, .8]
    -> best_of_n [F, T, F, | T, F, F]; best_random [F, T, T, | T, F, T]; best_worst [T, T, F, | T, F, T].
    """
    if mode not in PF_FILTERS:
        raise ValueError(f"unknown filter '{mode}'; have {PF_FILTERS}")
    if group_size < 2 and mode != "best_of_n":
        raise ValueError(f"{mode} keeps 2 samples per prompt: group_size must be >= 2, got {group_size}")
    g = rewards.float().view(-1, group_size)
    best = torch.sort(g, dim=1, descending=True, stable=True).indices[:, 0]
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, best[:, None], True)
    if mode == "best_random":
        z = noise.float().view(-1, group_size).masked_fill(keep, float("-inf"))
        keep.scatter_(1, z.argmax(1, keepdim=True), True)
    elif mode == "best_worst":  # the lowest; among equals the latest (never the best itself when all tie)
        worst = group_size - 1 - torch.sort(g.flip(1), dim=1, stable=True).indices[:, 0]
        keep.scatter_(1, worst[:, None], True)
    return keep.view(-1)


def r_squared(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Pearson correlation of (n,) ``x`` and ``y``: the R^2 of the least-squares line y ~ a x + b;
    NaN when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return ((x * y).sum() ** 2 / ((x * x).sum() * (y * y).sum())).float()
