"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306): alignment from unpaired thumbs-up / thumbs-down feedback.

Data: rows ``{prompt, completion, label}`` from a file or hub set, a preference file split into a desirable
and an undesirable row per pair (``data.pairs_as_feedback``), or the built-in arithmetic pairs split the same
way. One step, on a batch of rows (the policy adapter against the same base with adapters off):

  1. the rows' summed completion log-probs under the policy (with grad) and the reference (no grad);
  2. the reference point z0: every prompt with the previous row's completion (mismatched pairs, as TRL
     builds them), policy minus reference, averaged, clamped at 0, detached;
  3. ``lowalign.losses.kto_loss``: lambda_D (1 - sigma(beta (r - z0))) for desirable rows and
     lambda_U (1 - sigma(beta (z0 - r))) for undesirable ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowalign.algorithms import register
from lowalign.algorithms.configs import PreferenceConfig
from lowalign.algorithms.pairs import (
    PreferenceObjective,
    completion_logps,
    heldout_mean,
    preference_hits,
    run_feedback,
    train_preference,
)
from lowalign.config import F
from lowalign.losses import kto_loss, kto_reference_point


@dataclass
class KTOConfig(PreferenceConfig):
    beta: float = F(0.1, "Scale of the implicit reward beta (logp - ref).", gt=0)
    desirable_weight: float = F(1.0, "lambda_D: weight of desirable rows. The paper keeps lambda_D n_D / "
                                     "(lambda_U n_U) in [1, 4/3]; raise it further when the undesirable rows "
                                     "share most tokens with the desirable ones and the rewards of both fall "
                                     "(rewards/desirable < 0).", gt=0)
    undesirable_weight: float = F(1.0, "lambda_U: weight of undesirable rows.", gt=0)


def mismatched(rows: list[dict]) -> list[str]:
    """Each row's prompt is paired with the previous row's completion (the first with the last's)."""
    comps = [r["completion"] for r in rows]
    return comps[-1:] + comps[:-1]


def objective(ctx, data) -> PreferenceObjective:
    tc, bundle = ctx.cfg.train, ctx.bundle

    def loss(batch, _idx):
        d = ctx.dist
        rows, other = d.shard(batch), d.shard(mismatched(batch))  # mismatched within the whole batch
        prompts, comps = _columns(rows)
        labels = torch.tensor([bool(r["label"]) for r in rows], device=bundle.device)
        n = len(rows)
        lp, _ = completion_logps(bundle, prompts, comps)
        with torch.no_grad():
            kl_lp, _ = completion_logps(bundle, prompts, other)
            with bundle.use("reference"):
                ref, _ = completion_logps(bundle, prompts * 2, comps + other)
        z0 = kto_reference_point(d.gather(kl_lp), d.gather(ref[n:]))  # over every rank's rows
        kw = dict(beta=tc.beta, desirable_weight=tc.desirable_weight, undesirable_weight=tc.undesirable_weight)
        out = kto_loss(lp, ref[:n], labels, z0, **kw)
        if d.world > 1:  # metrics over the whole batch (the rewards of its desirable rows, ...), as one process
            every = d.gather(lp.detach()), d.gather(ref[:n]), d.gather(labels.long()).bool()
            out.metrics = kto_loss(*every, z0, **kw).metrics
        return out

    ref_eval = {}  # held-out chunk offset -> its reference log-probs: the held-out rows are fixed

    def heldout(rows):
        """label_accuracy: share of held-out rows whose implicit reward logp - ref has the sign of the label
        (a tie counts one half: a fresh adapter scores 0.5)."""

        def hits(chunk, start):
            if start not in ref_eval:
                with bundle.use("reference"):
                    ref_eval[start] = completion_logps(bundle, *_columns(chunk))[0]
            lp, _ = completion_logps(bundle, *_columns(chunk))
            sign = torch.tensor([1.0 if r["label"] else -1.0 for r in chunk], device=lp.device)
            return preference_hits(sign * (lp - ref_eval[start].to(lp.device)))

        return {"label_accuracy": heldout_mean(bundle, rows, hits)}

    return PreferenceObjective(loss, heldout, whole_batch=True)


def _columns(rows):
    return [r["prompt"] for r in rows], [r["completion"] for r in rows]


def train(ctx) -> dict:
    return train_preference(ctx, "kto", lambda data: objective(ctx, data), load=run_feedback,
                            unit="rows", bar_fields=("loss", "kl", "rewards/desirable", "rewards/undesirable"))


register("kto", KTOConfig, train, data="feedback", shards="batch_size")
