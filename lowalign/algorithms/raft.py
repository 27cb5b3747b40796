"""RAFT, reward-ranked fine-tuning (Dong et al. 2023, arXiv 2304.06767): each step samples
``num_generations`` completions per prompt from the policy (the GRPO step's sampling and scoring), keeps the
best of each prompt by reward (``keep_per_prompt``, optionally only those scoring ``>= min_reward``), and
fine-tunes the policy on the kept completions with the token-mean NLL; iterated, the policy climbs the reward
without a critic, advantages or ratios. ``kl_coef > 0`` adds a KL prior to the reference (adapters off), which
is SuperHF (``superhf.py``). The losses are ``lowalign.losses.best_of_n_mask`` / ``filtered_sft_loss``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from lowalign.algorithms import register
from lowalign.algorithms.common import POLICY, optimizer_step
from lowalign.algorithms.configs import SamplingConfig, micro_batch
from lowalign.algorithms.grpo import completion_logprobs, reward_metrics, sample_and_score, train_rollouts
from lowalign.config import ConfigError, F
from lowalign.losses.filtering import best_of_n_mask, filtered_sft_loss


@dataclass
class RAFTConfig(SamplingConfig):
    keep_per_prompt: int = F(1, "Samples kept per prompt, best rewards first (1: best-of-N).", ge=1)
    min_reward: float | None = F(None, "Keep only samples with at least this reward (null: no threshold).")
    sft_epochs: int = F(1, "Optimizer passes over each step's kept completions.", ge=1)
    kl_coef: float = F(0.0, "Weight of the KL prior to the reference on the kept tokens (0: RAFT; > 0: "
                            "SuperHF).", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = F("k3", "Per-token KL estimator of the prior.")


def filter_step(ctx, step: int, opt, sched, rewards) -> dict:
    """Sample, keep the best, fine-tune on them (``sft_epochs`` optimizer steps, micro-batched)."""
    tc, bundle = ctx.cfg.train, ctx.bundle
    t0 = time.time()
    rows, roll, rb, t_gen = sample_and_score(ctx, step, rewards)
    d = ctx.dist
    keep = best_of_n_mask(rb.total, tc.num_generations, tc.keep_per_prompt, tc.min_reward)
    kept = roll.select(keep)
    K, K_all = len(kept.texts), int(d.sum(len(kept.texts)))  # kept here, kept on every rank
    m = {"step": step + 1, **reward_metrics(d, rb, tc.num_generations),
         "kept": K_all, "loss": 0.0, "nll": 0.0, "kl": 0.0, "grad_norm": 0.0}
    if K_all:  # nothing kept (every sample under min_reward): no update this step
        m["reward_kept"] = d.sum(rb.total[keep].sum().item()) / K_all
        cmask = kept.completion_mask.float()
        ref = None
        if tc.kl_coef > 0 and K:
            with torch.no_grad(), bundle.use("reference"):
                ref, _ = completion_logprobs(bundle, kept)
        mb = micro_batch(tc, K)
        chunks = [slice(s, min(K, s + mb)) for s in range(0, K, mb)]
        n_tokens = d.sum(cmask.sum()).clamp(min=1.0)  # the kept tokens of every rank
        params = bundle.adapter_parameters(POLICY)
        agg = {}
        with bundle.use(POLICY):
            for _ in range(tc.sft_epochs):
                for sl in chunks:
                    lp, _ = completion_logprobs(bundle, kept, rows=sl)
                    out = filtered_sft_loss(lp, cmask[sl], None if ref is None else ref[sl], tc.kl_coef,
                                            tc.kl_estimator)
                    w = cmask[sl].sum() / n_tokens  # micro-batch token means -> the step's token mean
                    (out.loss * w).backward()
                    for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                        agg[k] = agg.get(k, 0.0) + float(v * w) / tc.sft_epochs
                gn = optimizer_step(d, params, opt, None, tc.optim.max_grad_norm)
        agg = {k: d.sum(agg.get(k, 0.0)) for k in ("loss", "nll", "kl")}  # token-weighted: they add up
        m.update(agg, grad_norm=float(gn), completion_length=d.sum(cmask.sum().item()) / K_all)
    sched.step()  # one schedule step per training step, kept or not, so resume and the schedule agree
    m.update({"lr": sched.get_last_lr()[0], "time/generate_s": round(t_gen, 3),
              "time/step_s": round(time.time() - t0, 3)})
    return m


def check(cfg) -> None:
    tc = cfg.train
    if tc.keep_per_prompt > tc.num_generations:
        raise ConfigError(f"train.keep_per_prompt: {tc.keep_per_prompt} is more than the "
                          f"{tc.num_generations} samples per prompt (train.num_generations)")


def train(ctx) -> dict:
    prior = ("kl",) if ctx.cfg.train.kl_coef > 0 else ()
    return train_rollouts(ctx, ctx.cfg.algorithm, step_fn=filter_step,
                          fields=("reward", "reward_kept", "kept", "nll", *prior))


register("raft", RAFTConfig, train, check=check, shards="prompts_per_step")
