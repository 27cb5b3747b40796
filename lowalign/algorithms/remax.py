"""ReMax (Li et al. 2023, arXiv 2310.10505): REINFORCE whose baseline is the reward of the greedy completion
of the same prompt. One extra greedy rollout per prompt (no grad, no critic, no group needed), then the GRPO
step's clipped surrogate with ``A_i = r(sampled_i) - r(greedy)`` (``lowalign.losses.remax_advantages``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowalign.algorithms import register
from lowalign.algorithms.common import POLICY
from lowalign.algorithms.configs import RolloutConfig
from lowalign.algorithms.grpo import AdvantageEstimator, train_rollouts
from lowalign.config import F
from lowalign.generation import generate
from lowalign.losses.reinforce import remax_advantages
from lowalign.rewards import row_columns


@dataclass
class ReMaxConfig(RolloutConfig):
    num_generations: int = F(1, "Sampled completions per prompt (ReMax needs one; more widen the batch, all "
                                "sharing the prompt's greedy baseline).", ge=1)


@torch.no_grad()
def greedy_baseline(ctx, rows, roll, rb, rewards, old, ref):
    tc, bundle = ctx.cfg.train, ctx.bundle
    prompts = [r["prompt"] for r in rows]
    with bundle.use(POLICY):
        greedy = generate(bundle, prompts, max_new_tokens=tc.max_new_tokens, do_sample=False)
    base = rewards(prompts, greedy.texts, row_columns(rows, 1)).total
    return remax_advantages(rb.total, base, tc.num_generations), {"reward_greedy": base.mean().item()}


def train(ctx) -> dict:
    return train_rollouts(ctx, "remax", AdvantageEstimator(greedy_baseline),
                          fields=("reward", "reward_greedy", "clip_ratio/region", "completion_length"))


register("remax", ReMaxConfig, train, shards="prompts_per_step")
