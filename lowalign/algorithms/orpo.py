"""ORPO (Hong et al. 2024, arXiv 2403.07691): supervised fine-tuning on the chosen completion plus an
odds-ratio preference term, in one loss, with no reference model: no reference forward ever runs, so a step
costs one policy pass over the pair batch (``lowalign.losses.orpo_loss``)."""

from __future__ import annotations

from dataclasses import dataclass

from lowalign.algorithms import register
from lowalign.algorithms.configs import PreferenceConfig
from lowalign.algorithms.pairs import PreferenceObjective, average_logp_accuracy, average_logps, train_preference
from lowalign.config import F
from lowalign.losses import orpo_loss


@dataclass
class ORPOConfig(PreferenceConfig):
    lam: float = F(0.1, "Weight of the odds-ratio term next to the chosen NLL (the paper's lambda, TRL's beta).",
                   gt=0)


def objective(ctx, data) -> PreferenceObjective:
    tc, bundle = ctx.cfg.train, ctx.bundle

    def loss(pairs, _idx):
        a = average_logps(bundle, pairs)
        return orpo_loss(a[:len(pairs)], a[len(pairs):], lam=tc.lam)

    return PreferenceObjective(loss, average_logp_accuracy(ctx))


def train(ctx) -> dict:
    return train_preference(ctx, "orpo", lambda data: objective(ctx, data),
                            bar_fields=("loss", "nll/chosen", "log_odds_ratio"))


register("orpo", ORPOConfig, train, data="preferences", shards="batch_size")
