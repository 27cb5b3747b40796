"""DPO on the shared base: the policy adapter against the same base with adapters off.

Chosen and rejected completions go through the fused log-prob path in one batch. Reference log-probs
are precomputed once for the whole set (cached next to the run, keyed by data and model) or computed
per step with adapters off; either way no second model exists. The loop is the one all preference
algorithms share (``pairs.train_preference``).
"""

from __future__ import annotations

import torch

from lowalign.algorithms import register
from lowalign.algorithms.configs import DPOConfig
from lowalign.algorithms.pairs import (
    PreferenceObjective,
    implicit_reward_accuracy,
    reference_logps,
    sequence_logps,
    train_preference,
)
from lowalign.losses import dpo_loss


def objective(ctx, data) -> PreferenceObjective:
    tc, bundle = ctx.cfg.train, ctx.bundle
    ref_all = reference_logps(ctx, data.train) if tc.precompute_ref else None

    def loss(pairs, idx):
        n = len(pairs)
        lp, lens = sequence_logps(bundle, pairs)
        if ref_all is not None:
            ref = ref_all[idx].to(lp.device)
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        else:
            with torch.no_grad(), bundle.use("reference"):
                rl, _ = sequence_logps(bundle, pairs)
            ref_c, ref_r = rl[:n], rl[n:]
        out = dpo_loss(lp[:n], lp[n:], ref_c, ref_r, beta=tc.beta, loss_type=tc.loss_type,
                       label_smoothing=tc.label_smoothing, chosen_lengths=lens[:n], rejected_lengths=lens[n:])
        if tc.rpo_alpha:
            nll = -(lp[:n] / lens[:n].clamp(min=1)).mean()
            out.loss = out.loss + tc.rpo_alpha * nll
            out.metrics["nll/chosen"] = nll.detach()
        return out

    return PreferenceObjective(loss, implicit_reward_accuracy(ctx))


def train(ctx) -> dict:
    return train_preference(ctx, "dpo", lambda data: objective(ctx, data))


register("dpo", DPOConfig, train, data="preferences", shards="batch_size")
