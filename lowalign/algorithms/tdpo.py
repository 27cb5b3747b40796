"""Token-level DPO (Zeng et al. 2024, arXiv 2404.11999): DPO's margin corrected by each completion's
sequential KL, the sum over its tokens of the full-vocabulary KL(reference || policy).

One step: the reference backbone pass (adapters off, no grad) and the policy pass over the pair batch; then
the fused KL kernel (``lowalign.kernels.kl``) gives, per completion token, the exact KL over the whole
vocabulary and both sides' target log-probs from the two hidden-state tensors and the lm_head, streaming the
vocabulary and never building ``[tokens x vocab]`` logits (``lowalign.losses.tdpo1_loss`` / ``tdpo2_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lowalign.algorithms import register
from lowalign.algorithms.configs import PreferenceConfig
from lowalign.algorithms.pairs import (
    PreferenceObjective,
    encode_pairs,
    implicit_reward_accuracy,
    train_preference,
)
from lowalign.config import F
from lowalign.logprobs import kl_from_hidden
from lowalign.losses import PREFERENCE_LOSSES
from lowalign.prompt_sharing import completion_hidden_states


@dataclass
class TDPOConfig(PreferenceConfig):
    variant: Literal["tdpo1", "tdpo2"] = F("tdpo2", "tdpo1: the KL difference enters whole; tdpo2: the chosen "
                                                    "side's KL is detached and weighted by alpha (paper's default).")
    beta: float = F(0.1, "KL strength, as DPO's beta.", gt=0)
    alpha: float = F(0.5, "Weight of the sequential-KL difference (the paper's TDPO1 is alpha = 1).", ge=0)
    reference_cache_dir: str | None = F(None, "Where the held-out pairs' reference log-probs are cached (default: "
                                              "the run directory).")


def sequence_kl(bundle, pairs):
    """Per completion (chosen then rejected, (2B,) each): the summed log-ratio policy - reference of its
    tokens and its sequential KL, sum_t KL(reference(.|y<t) || policy(.|y<t))."""
    b = encode_pairs(bundle, pairs)
    parts = (b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)  # a pair's prompt runs once
    with torch.no_grad(), bundle.use("reference"):
        ref_hidden = completion_hidden_states(bundle, *parts)
        ref_head = bundle.lm_head()
    hidden = completion_hidden_states(bundle, *parts)
    tk = kl_from_hidden(bundle, hidden, ref_hidden, ref_head, b.input_ids, b.target_mask)
    m = b.target_mask.float()
    return ((tk.logps - tk.ref_logps) * m).sum(1), (tk.kl * m).sum(1)


def objective(ctx, data) -> PreferenceObjective:
    tc, bundle = ctx.cfg.train, ctx.bundle
    loss_fn = PREFERENCE_LOSSES[tc.variant]

    def loss(pairs, _idx):
        n = len(pairs)
        ratio, kl = sequence_kl(bundle, pairs)
        return loss_fn(ratio[:n], ratio[n:], kl[:n], kl[n:], beta=tc.beta, alpha=tc.alpha)

    return PreferenceObjective(loss, implicit_reward_accuracy(ctx))


def train(ctx) -> dict:
    return train_preference(ctx, ctx.cfg.train.variant, lambda data: objective(ctx, data),
                            bar_fields=("loss", "rewards/accuracy", "kl/rejected"))


register("tdpo", TDPOConfig, train, data="preferences", shards="batch_size")
