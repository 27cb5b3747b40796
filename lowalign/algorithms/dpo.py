"""DPO on the shared base: the policy adapter against the same base with adapters off.

Chosen and rejected completions go through the fused log-prob path in one batch. Reference log-probs
are precomputed once for the whole set (cached next to the run, keyed by data and model) or computed
per step with adapters off; either way no second model exists.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lowalign.algorithms import register
from lowalign.algorithms.common import (
    add_policy,
    end_step,
    evaluate,
    finish,
    make_optimizer,
    start_or_resume,
    step_seed,
)
from lowalign.algorithms.configs import DPOConfig
from lowalign.algorithms.pairs import encode_pairs, pair_batch, run_pairs
from lowalign.config import reference_mode
from lowalign.logprobs import token_logprobs
from lowalign.losses import dpo_loss
from lowalign.runtime import Progress, atomic_write, seed_everything

POLICY = "policy"


def sequence_logps(bundle, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and lengths, chosen then rejected: (2B,), (2B,)."""
    b = encode_pairs(bundle, pairs)
    out = token_logprobs(bundle, b.input_ids, b.attention_mask, b.target_mask)
    m = b.target_mask.float()
    return (out.logps * m).sum(1), m.sum(1)


@torch.no_grad()
def reference_logps(ctx, pairs: list[dict], batch_size: int = 128) -> torch.Tensor:
    """Reference log-probs of every pair, (n, 2) [chosen, rejected], cached as safetensors in the run
    directory (or ``train.reference_cache_dir``), keyed by the pairs' text and the *content* of the model,
    tokenizer and starting adapter (``lowalign.models.fingerprint``): a model re-saved at the same path with
    other weights gets its reference recomputed."""
    from safetensors.torch import load_file, save_file

    from lowalign.models import fingerprint

    m, ref = ctx.cfg.model, reference_mode(ctx.cfg)
    key = hashlib.sha256(json.dumps([pairs, fingerprint(m.name_or_path), m.quantization, m.dtype, ref,
                                     fingerprint(ctx.cfg.lora.init_from) if ref == "init" else None],
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(ctx.cfg.train.reference_cache_dir or ctx.run_dir.path)
    cache = cache_dir / f"ref_logps-{key}.safetensors"
    if cache.exists():
        return load_file(str(cache))["ref_logps"]
    out = []
    with ctx.bundle.use("reference"), ctx.bundle.eval_mode():
        for s in range(0, len(pairs), batch_size):
            lp, _ = sequence_logps(ctx.bundle, pairs[s:s + batch_size])
            n = len(pairs[s:s + batch_size])
            out.append(torch.stack([lp[:n], lp[n:]], 1).cpu())
    ref_lp = torch.cat(out)
    atomic_write(cache, lambda p: save_file({"ref_logps": ref_lp.contiguous()}, str(p)))
    return ref_lp


@torch.no_grad()
def preference_accuracy(ctx, pairs: list[dict], batch_size: int = 128) -> float:
    """Share of held-out pairs where the policy's implicit reward prefers the chosen completion (ties
    count one half: a fresh adapter equals the reference and scores 0.5)."""
    ref = reference_logps(ctx, pairs)
    hits = 0
    with ctx.bundle.use(POLICY), ctx.bundle.eval_mode():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            lp, _ = sequence_logps(ctx.bundle, chunk)
            n = len(chunk)
            r = ref[s:s + n].to(lp.device)
            margin = (lp[:n] - r[:, 0]) - (lp[n:] - r[:, 1])
            hits += float((margin > 0).sum() + 0.5 * (margin == 0).sum())  # a tie is a coin flip
    return hits / max(1, len(pairs))


def train(ctx) -> dict:
    cfg, tc, bundle = ctx.cfg, ctx.cfg.train, ctx.bundle
    add_policy(ctx)
    data = run_pairs(ctx, tc, role=POLICY)  # the fresh adapter is the starting policy
    ref_all = reference_logps(ctx, data.train) if tc.precompute_ref else None
    params = bundle.adapter_parameters(POLICY)
    opt, sched = make_optimizer(params, tc.optim, tc.steps)

    def evaluate_fn(c):
        res = evaluate(c) if c.data.eval_rows_all else {}
        res["preference_accuracy"] = preference_accuracy(c, data.eval)
        return res

    start, baseline = start_or_resume(ctx, [POLICY], opt, sched, evaluate_fn=evaluate_fn)
    bundle.base.train()
    with Progress(tc.steps, start, ("loss", "rewards/accuracy", "rewards/margin"), desc="dpo",
                  every=tc.log_every) as bar:
        for step in range(start, tc.steps):
            seed_everything(step_seed(cfg.seed, step))
            idx = pair_batch(data.train, step, tc.batch_size, cfg.seed)
            pairs = [data.train[i] for i in idx]
            n = len(pairs)
            with bundle.use(POLICY):
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
            loss = out.loss
            if tc.rpo_alpha:
                nll = -(lp[:n] / lens[:n].clamp(min=1)).mean()
                loss = loss + tc.rpo_alpha * nll
                out.metrics["nll/chosen"] = nll.detach()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, tc.optim.max_grad_norm or float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            m = {"step": step + 1, "loss": out.loss.item(), **{k: float(v) for k, v in out.metrics.items()},
                 "grad_norm": float(gn), "lr": sched.get_last_lr()[0]}
            end_step(ctx, tc, step + 1, m, bar, [POLICY], baseline, opt, sched, evaluate_fn=evaluate_fn)
    return finish(ctx, [POLICY], baseline, {"steps": tc.steps, "pairs": len(data.train)}, evaluate_fn)


register("dpo", DPOConfig, train, data="preferences")
