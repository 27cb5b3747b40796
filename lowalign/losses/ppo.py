"""PPO for language models: per-token rewards, GAE, whitening, the clipped policy + value loss, and the
adaptive KL coefficient. Pure functions on tensors.

Shapes: ``B`` sequences, ``T`` completion tokens; ``mask`` (B, T) is 1 on completion tokens (up to and
including EOS) and 0 on padding. Formulas follow Schulman et al. 2017 (PPO, arXiv 1707.06347), GAE (Schulman
et al. 2015, arXiv 1506.02438), Ziegler et al. 2019 (arXiv 1909.08593) for the KL-shaped reward and the
adaptive coefficient, and TRL's PPO trainer for whitening and the value clip (checked in tests/losses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowalign.kernels.logprobs import kl_from_logps
from lowalign.losses.common import masked_mean


def _masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance of ``x`` over positions where ``mask`` is 1."""
    n = mask.sum()
    if n < 2:
        raise ValueError(f"whiten needs at least 2 valid positions, got {int(n)}")
    mean = masked_mean(x, mask)
    return ((x - mean) ** 2 * mask).sum() / (n - 1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalize ``x`` to zero mean, unit variance over the valid positions.

        out = (x - mean) * rsqrt(var + 1e-8)      (+ mean again when shift_mean=False)

    mean and var (unbiased, as ``torch.var``) are over positions with ``mask == 1``; masked positions are
    transformed too (callers zero them). Shapes: x, mask (B, T) (any equal shapes).
    """
    mask = mask.to(x.dtype)
    mean, var = masked_mean(x, mask), _masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's valid tokens (Schulman et al. 2015).

        delta_t = r_t + gamma * V_{t'} - V_t        t' = the next valid position after t (V = 0 past the end)
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V_t                          (returns, the value target; before any whitening)

    Positions with ``mask == 0`` contribute nothing (they are skipped, not treated as zero-reward steps)
    and receive 0 in both outputs.

    Args:
        rewards, values, mask: (B, T).
    Returns:
        (advantages, returns), each (B, T) float32.

    Worked example: rewards [0, 0, 1], values [.5, .6, .7], gamma 1, lam .5 -> deltas [.1, .1, .3],
    A = [.1 + .5 (.1 + .5 * .3), .1 + .5 * .3, .3] = [.225, .25, .3], R = [.725, .85, 1.0].
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"rewards, values, mask must share a shape: {rewards.shape}, {values.shape}, {mask.shape}")
    m = mask.float()
    r, v = rewards.float() * m, values.float() * m
    B, T = r.shape
    next_value = torch.zeros(B, device=r.device)
    last = torch.zeros(B, device=r.device)
    adv = torch.zeros(B, T, device=r.device)
    for t in reversed(range(T)):
        valid = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        a = delta + gamma * lam * last
        # a masked position passes the running estimate and the next value through untouched
        last = torch.where(valid.bool(), a, last)
        next_value = torch.where(valid.bool(), v[:, t], next_value)
        adv[:, t] = a * valid
    return adv, (adv + v) * m


def kl_shaped_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float, kl_estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF PPO (Ziegler et al. 2019): a KL penalty on every completion token and the
    sequence score on the last one.

        r_t = -kl_coef * kl_t  (+ score on the last valid token of the row)
        kl_t = k1: logp_t - ref_t  |  k3: exp(ref_t - logp_t) - (ref_t - logp_t) - 1

    Args:
        scores: (B,) sequence rewards; logps, ref_logps, mask: (B, T) (sampling-policy log-probs).
    Returns:
        (rewards (B, T), kl (B, T)), both 0 where mask is 0.
    """
    m = mask.float()
    kl = kl_from_logps(logps.float(), ref_logps.float(), kl_estimator) * m
    rewards = -kl_coef * kl
    T = m.shape[1]
    last = (torch.arange(T, device=m.device) * m.long()).argmax(1)  # (B,) last valid position
    has = m.sum(1) > 0
    rewards[torch.arange(m.shape[0], device=m.device)[has], last[has]] += scores.float().to(m.device)[has]
    return rewards, kl


def dpo_token_rewards(dpo_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """RTO's dense reward (Zhong et al. 2024, "DPO Meets PPO: Reinforced Token Optimization for RLHF", arXiv
    2404.18922, eq. 4.2): a DPO policy's implicit reward of each generated token.

        r_t = beta * (log pi_dpo(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t))

    Args:
        dpo_logps, ref_logps, mask: (B, T) log-probs of the sampled tokens under the DPO policy and the
            reference; mask 1 on completion tokens.
    Returns:
        (B, T), 0 where mask is 0; exactly 0 everywhere when the DPO policy is the reference.

    Worked example: dpo [[-1, -2]], ref [[-1.5, -1]], beta 0.1 -> [[0.05, -0.1]].
    """
    return beta * (dpo_logps.float() - ref_logps.float()) * mask.float()


def calibrated_rewards(rewards: torch.Tensor, confidence: torch.Tensor, running_mean: float,
                       weight: float) -> torch.Tensor:
    """PPO-C's reward calibration (Leng et al. 2024, "Taming Overconfidence in LLMs: Reward Calibration in
    RLHF", arXiv 2410.09724): a reward moves away from the running mean of past rewards in proportion to the
    confidence the completion states, so stated confidence pays only where the answer is better than usual.

        r'_i = r_i + weight * (c_i - 1/2) * (r_i - r_bar)

    Args:
        rewards: (B,) sequence rewards; confidence: (B,) stated confidence in [0, 1], NaN where the completion
            states none (its reward is left as it is); running_mean: r_bar, the mean of past rewards.
    Returns:
        (B,) adjusted rewards.

    Worked example: rewards [1, 0, 1], confidence [0.9, 0.9, NaN], r_bar 0.5, weight 1
    -> [1 + 0.4 * 0.5, 0 + 0.4 * -0.5, 1] = [1.2, -0.2, 1].
    """
    c = confidence.float().to(rewards.device)
    adj = weight * (c - 0.5) * (rewards.float() - running_mean)
    return rewards.float() + torch.where(torch.isnan(c), torch.zeros_like(adj), adj)


@dataclass
class PPOLossOutput:
    """Named results of :func:`ppo_loss`; ``loss`` carries gradients, the rest are detached."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    policy_clipfrac: torch.Tensor
    value_clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    explained_variance: torch.Tensor

    def metrics(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in self.__dataclass_fields__}


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip: float = 0.2,
             value_clip: float = 0.2, vf_coef: float = 0.1, num_tokens: float | None = None) -> PPOLossOutput:
    """Clipped surrogate policy loss plus clipped value loss (PPO; TRL's PPO trainer).

        rho          = exp(logp - old_logp)
        policy_loss  = masked_mean( max(-A rho, -A clip(rho, 1 - clip, 1 + clip)) )
        v_clipped    = clip(v, v_old - value_clip, v_old + value_clip)
        value_loss   = 0.5 masked_mean( max((v - R)^2, (v_clipped - R)^2) )
        loss         = policy_loss + vf_coef * value_loss
        approx_kl    = 0.5 masked_mean((logp - old_logp)^2)
        explained_variance = 1 - Var[R - v_old] / Var[R]       (masked, of the rollout's values)

    With ``num_tokens`` the two losses are sums over the valid tokens divided by it (the minibatch's token
    count, so micro-batches and ranks add up to the minibatch's token mean) instead of masked means.

    Args:
        logps, old_logps, advantages, values, old_values, returns, mask: (B, T). ``values`` carries the
            critic's gradient, ``logps`` the actor's; the others are rollout constants.
    Returns:
        :class:`PPOLossOutput` (loss, policy_loss, value_loss, policy_clipfrac, value_clipfrac, approx_kl,
        ratio_mean, explained_variance).
    """
    m = mask.to(logps.dtype)
    diff = logps - old_logps
    ratio = torch.exp(diff)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    def mean(x):
        return masked_mean(x, m) if num_tokens is None else (x * m).sum() / max(float(num_tokens), 1.0)

    policy_loss = mean(torch.max(pg1, pg2))
    v_clipped = torch.clamp(values, old_values - value_clip, old_values + value_clip)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    value_loss = 0.5 * mean(torch.max(vf1, vf2))
    with torch.no_grad():
        ev = explained_variance(returns, old_values, m)
        out = dict(policy_clipfrac=masked_mean((pg2 > pg1).float(), m),
                   value_clipfrac=masked_mean((vf2 > vf1).float(), m),
                   approx_kl=0.5 * masked_mean(diff ** 2, m), ratio_mean=masked_mean(ratio, m),
                   explained_variance=ev)
    return PPOLossOutput(loss=policy_loss + vf_coef * value_loss, policy_loss=policy_loss.detach(),
                         value_loss=value_loss.detach(), **out)


def explained_variance(returns: torch.Tensor, old_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - v_old] / Var[R] over the valid tokens: how much of the returns the critic's rollout values
    explain (1: all; 0: no better than their mean; NaN when the returns do not vary)."""
    m = mask.float()
    var_r = _masked_var(returns, m) if m.sum() > 1 else torch.tensor(0.0)
    return 1 - _masked_var(returns - old_values, m) / var_r if var_r > 0 else torch.tensor(float("nan"))


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """One update of the adaptive KL coefficient (Ziegler et al. 2019, Sec. 2.2):

        e = clip(kl / target - 1, -0.2, 0.2);   coef <- coef * (1 + e * n_steps / horizon)

    ``kl`` is the mean per-sequence KL of the batch just collected, ``n_steps`` its number of sequences.
    """
    e = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + e * n_steps / horizon)


class RunningMoments:
    """Running mean and (unbiased) std of rewards over all batches seen (Chan et al. parallel update), for
    ``reward_norm``; its state is three floats, saved with each checkpoint."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 1e-8):
        self.mean, self.var, self.count = mean, var, count

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item() if x.numel() > 1 else 0.0
        delta, tot = mean - self.mean, self.count + n
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / tot
        self.mean, self.var, self.count = self.mean + delta * n / tot, m2 / tot, tot

    @property
    def std(self) -> float:
        return (self.var * self.count / max(self.count - 1, 1e-8)) ** 0.5

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}
