"""SimPO (Meng et al. 2024, arXiv 2405.14734): a length-normalized preference margin with a target reward
margin gamma, and no reference model: no reference forward ever runs (``lowalign.losses.simpo_loss``)."""

from __future__ import annotations

from dataclasses import dataclass

from lowalign.algorithms import register
from lowalign.algorithms.configs import PreferenceConfig
from lowalign.algorithms.pairs import PreferenceObjective, average_logp_accuracy, average_logps, train_preference
from lowalign.config import F
from lowalign.losses import simpo_loss


@dataclass
class SimPOConfig(PreferenceConfig):
    beta: float = F(2.0, "Scale of the length-averaged log-prob reward (the paper uses 2 to 10).", gt=0)
    gamma: float = F(0.5, "Target reward margin subtracted inside the sigmoid (TRL's simpo_gamma).", ge=0)
    label_smoothing: float = F(0.0, "Assumed label-noise rate (conservative loss).", ge=0, lt=0.5)


def objective(ctx, data) -> PreferenceObjective:
    tc, bundle = ctx.cfg.train, ctx.bundle

    def loss(pairs, _idx):
        a = average_logps(bundle, pairs)
        return simpo_loss(a[:len(pairs)], a[len(pairs):], beta=tc.beta, gamma=tc.gamma,
                          label_smoothing=tc.label_smoothing)

    return PreferenceObjective(loss, average_logp_accuracy(ctx))


def train(ctx) -> dict:
    return train_preference(ctx, "simpo", lambda data: objective(ctx, data))


register("simpo", SimPOConfig, train, data="preferences", shards="batch_size")
