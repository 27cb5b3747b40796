"""RRHF (Yuan et al. 2023, arXiv 2304.05302): Rank Responses to align with Human Feedback: a hinge on every
pair of a prompt's responses ordered by score, over length-averaged log-probs, plus SFT on the best
(``lowalign.losses.rrhf_loss``). No reference model."""

from __future__ import annotations

from dataclasses import dataclass

from lowalign.algorithms import register
from lowalign.algorithms.configs import ListwiseConfig
from lowalign.algorithms.listwise import check, listwise_objective, run_lists
from lowalign.algorithms.pairs import train_preference
from lowalign.config import F
from lowalign.data import is_builtin
from lowalign.losses import rrhf_loss


@dataclass
class RRHFConfig(ListwiseConfig):
    sft_weight: float = F(1.0, "Weight of the best response's per-token NLL (the paper weighs it 1).", ge=0)


def train(ctx) -> dict:
    tc = ctx.cfg.train
    return train_preference(ctx, "rrhf", lambda data: listwise_objective(ctx, rrhf_loss, sft_weight=tc.sft_weight),
                            load=run_lists, unit="lists", bar_fields=("loss", "ranking_accuracy", "nll/best"))


register("rrhf", RRHFConfig, train, check=check, shards="batch_size",
         data=lambda cfg: "prompts" if is_builtin(cfg.data) else "ratings")
