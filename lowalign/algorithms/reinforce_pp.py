"""REINFORCE++ (Hu 2025, arXiv 2501.03262): no critic, no group normalization. The per-token KL to the
reference is folded into the reward (k1 or k2, the score on the last token), returns-to-go are whitened over
every token of the global batch, and the GRPO step's PPO-style clipped surrogate trains on them
(``lowalign.losses.reinforce_pp_advantages``). ``baseline: true`` is REINFORCE++-baseline: each score minus
its prompt group's mean first."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

from lowalign.algorithms import register
from lowalign.algorithms.configs import RolloutConfig
from lowalign.algorithms.grpo import AdvantageEstimator, train_rollouts
from lowalign.config import ConfigError, F
from lowalign.losses.reinforce import reinforce_pp_advantages


@dataclass
class ReinforcePPConfig(RolloutConfig):
    kl_coef: float = F(0.01, "Coefficient of the per-token KL penalty folded into the reward.", ge=0)
    reward_kl_estimator: Literal["k1", "k2"] = F("k2", "KL in the reward: k1 = logp - ref, k2 = (logp - ref)^2 / 2.")
    baseline: bool = F(False, "REINFORCE++-baseline: subtract the mean score of each prompt's group first "
                              "(needs num_generations >= 2).")


def kl_shaped_returns(ctx, rows, roll, rb, rewards, old, ref):
    """Whitened over the step's whole batch: under torchrun, over every rank's tokens."""
    tc, d = ctx.cfg.train, ctx.dist
    mask = roll.completion_mask.float()
    adv, kl = d.on_whole_batch(partial(reinforce_pp_advantages, kl_coef=tc.kl_coef,
                                       kl_estimator=tc.reward_kl_estimator,
                                       group_size=tc.num_generations if tc.baseline else None),
                               rb.total.to(old.device), old, ref, mask)
    return adv, {"reward_kl": d.sum((kl * mask).sum()).item() / d.sum(mask.sum()).item()}


def check(cfg) -> None:
    if cfg.train.baseline and cfg.train.num_generations < 2:
        raise ConfigError("train.baseline: REINFORCE++-baseline subtracts a group mean: num_generations >= 2")


def train(ctx) -> dict:
    return train_rollouts(ctx, "reinforce++", AdvantageEstimator(kl_shaped_returns, needs_old=True, needs_ref=True),
                          fields=("reward", "reward_kl", "clip_ratio/region", "completion_length"))


register("reinforce_pp", ReinforcePPConfig, train, check=check, shards="prompts_per_step")
