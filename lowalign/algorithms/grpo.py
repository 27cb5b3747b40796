"""GRPO on the shared base: rollouts from the policy adapter, rewards, group advantages, clipped loss.

One step:
  1. sample ``prompts_per_step`` prompts, ``num_generations`` completions each, from the policy adapter
     (HF generate, KV cache, no merged weights);
  2. score them with the weighted reward sources; group-relative advantages;
  3. old log-probs (only when num_iterations > 1) and reference log-probs (only when beta > 0, adapters
     off) through the fused log-prob path, no grad;
  4. ``num_iterations`` optimizer steps on the clipped surrogate (micro-batched).
Deterministic: all randomness of step ``s`` derives from ``(seed, s)``, so resume is exact.

Step 2's advantages come from an :class:`AdvantageEstimator`; ReMax (``remax.py``) and REINFORCE++
(``reinforce_pp.py``) are this step with theirs, through :func:`train_rollouts`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from lowalign.algorithms import register
from lowalign.algorithms.common import (
    add_policy,
    end_step,
    finish,
    make_optimizer,
    optimizer_step,
    reward_sources,
    start_or_resume,
    step_seed,
)
from lowalign.algorithms.configs import GRPOConfig, micro_batch
from lowalign.config import ConfigError
from lowalign.distributed import world_size
from lowalign.generation import generate, row_seed
from lowalign.logprobs import logprobs_from_hidden
from lowalign.losses import grpo_advantages, grpo_loss
from lowalign.prompt_sharing import completion_hidden_states
from lowalign.rewards import RewardSources, row_columns
from lowalign.runtime import PHASES, Progress, seed_everything

POLICY = "policy"


def completion_logprobs(bundle, roll, temperature: float = 1.0, *, with_entropy=False, rows=None):
    """Per-token log-probs of the completion tokens at ``temperature``: (B, C) (+ entropy when asked). Rows
    that share a prompt compute it once (:func:`lowalign.prompt_sharing.completion_hidden_states`)."""
    sl = slice(None) if rows is None else rows
    P = roll.prompt_ids.shape[1]
    hidden = completion_hidden_states(bundle, roll.prompt_ids[sl], roll.prompt_mask[sl], roll.completion_ids[sl],
                                      roll.completion_mask[sl])
    out = logprobs_from_hidden(bundle, hidden, roll.input_ids[sl], roll.target_mask[sl], temperature=temperature,
                               with_entropy=with_entropy)
    ent = out.entropy[:, P:] if out.entropy is not None else None
    return out.logps[:, P:], ent


@dataclass(frozen=True)
class AdvantageEstimator:
    """How a step turns its scored rollout into advantages; GRPO's group baseline is one, ReMax's greedy
    baseline and REINFORCE++'s KL-shaped, batch-whitened returns are others.

    Attributes:
        fn: ``fn(ctx, rows, roll, rb, rewards, old, ref) -> (advantages (B,) or (B, C), metrics)``; ``rb``
            the rollout's scores, ``rewards`` the reward sources (to score more completions), ``old`` / ``ref``
            the rollout policy's / reference's completion log-probs (B, C) when asked for, else None.
        needs_old: compute the rollout policy's log-probs even with ``num_iterations == 1``.
        needs_ref: compute the reference's log-probs even with ``beta == 0``.
    """

    fn: Callable
    needs_old: bool = False
    needs_ref: bool = False


def _group_advantages(ctx, rows, roll, rb, rewards, old, ref):
    tc = ctx.cfg.train
    adv = partial(grpo_advantages, group_size=tc.num_generations, scale=tc.scale_rewards,
                  leave_one_out=tc.leave_one_out)
    if tc.scale_rewards == "batch":  # the std of every rank's rewards
        return ctx.dist.on_whole_batch(adv, rb.total), {}
    return adv(rb.total), {}  # groups never straddle ranks


GROUP = AdvantageEstimator(_group_advantages)


def sample_and_score(ctx, step: int, rewards: RewardSources):
    """Step ``step``'s prompts (seeded by ``(seed, step)``; under torchrun this rank's share of them),
    ``num_generations`` samples each from the policy, and their rewards. Every completion samples from its
    own stream, seeded by ``(seed, step)`` and its index in the step's whole batch, so it is the same on
    any number of ranks. Returns (rows, rollout, rewards batch, generation seconds)."""
    cfg, tc, bundle = ctx.cfg, ctx.cfg.train, ctx.bundle
    t0 = time.time()
    seed_everything(step_seed(cfg.seed, step))
    G = tc.num_generations
    rows, seeds = shard_prompts(ctx.dist, ctx.data.batch(step, tc.prompts_per_step, cfg.seed), G,
                                step_seed(cfg.seed, step))
    with bundle.use(POLICY), PHASES.phase("rollout"):
        roll = generate(bundle, [r["prompt"] for r in rows], max_new_tokens=tc.max_new_tokens,
                        do_sample=True, temperature=tc.temperature, top_p=tc.top_p, top_k=tc.top_k,
                        num_generations=G, row_seeds=seeds)
    t_gen = time.time() - t0
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    with PHASES.phase("scoring"):
        rb = rewards(prompts, roll.texts, row_columns(rows, G))
    return rows, roll, rb, t_gen


def shard_prompts(dist, batch: list[dict], num_generations: int, seed: int) -> tuple[list[dict], list[int]]:
    """This rank's share of a step's prompts, and the sampling seed of each of its ``num_generations``
    completions per prompt: a function of ``seed`` and the completion's index in the whole batch, so a
    rollout samples the same on any number of ranks (``generate(row_seeds=...)``)."""
    rows, first = dist.shard(batch), dist.bounds(len(batch))[0] * num_generations
    return rows, [row_seed(seed, first + i) for i in range(len(rows) * num_generations)]


def grpo_step(ctx, step: int, opt, sched, rewards: RewardSources, estimator: AdvantageEstimator = GROUP) -> dict:
    tc, bundle = ctx.cfg.train, ctx.bundle
    t0 = time.time()
    rows, roll, rb, t_gen = sample_and_score(ctx, step, rewards)
    G = tc.num_generations
    cmask = roll.completion_mask.float()
    B = cmask.shape[0]

    old = ref = None
    with torch.no_grad(), PHASES.phase("scoring"):
        if tc.num_iterations > 1 or estimator.needs_old:
            with bundle.use(POLICY):
                old, _ = completion_logprobs(bundle, roll, tc.temperature)
        if tc.beta != 0.0 or estimator.needs_ref:
            with bundle.use("reference"):
                ref, _ = completion_logprobs(bundle, roll, tc.temperature)
    adv, est_metrics = estimator.fn(ctx, rows, roll, rb, rewards, old, ref)
    adv = adv.to(bundle.device)
    t_score = time.time() - t0 - t_gen  # rewards, old / reference log-probs, advantages

    mb = micro_batch(tc, B)
    chunks = [slice(s, min(B, s + mb)) for s in range(0, B, mb)]
    d = ctx.dist
    n_items, B_all = d.sum(cmask.sum()), B * d.world  # the step's tokens and rows, over every rank
    params = bundle.adapter_parameters(POLICY)
    agg = {}
    with bundle.use(POLICY):
        for _ in range(tc.num_iterations):
            for sl in chunks:
                with PHASES.phase("forward_backward"):
                    lp, ent = completion_logprobs(bundle, roll, tc.temperature, with_entropy=True, rows=sl)
                    out = grpo_loss(lp, lp.detach() if old is None else old[sl], adv[sl], cmask[sl],
                                    ref_logps=None if ref is None else ref[sl], beta=tc.beta,
                                    epsilon_low=tc.epsilon_low, epsilon_high=tc.epsilon_high,
                                    loss_type=tc.loss_type, max_completion_length=tc.max_new_tokens,
                                    kl_estimator=tc.kl_estimator, entropy=ent, num_items=n_items)
                    # dapo normalizes by the step's token count already; the others average micro-batches
                    scale = 1.0 if tc.loss_type == "dapo" else (sl.stop - sl.start) / B_all
                    (out.loss * scale).backward()
                for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
                    agg[k] = agg.get(k, 0.0) + float(v) * (sl.stop - sl.start) / B / tc.num_iterations
            gn = optimizer_step(d, params, opt, sched, tc.optim.max_grad_norm)

    t_step = time.time() - t0
    m = {"step": step + 1, **reward_metrics(d, rb, G), **d.mean({**agg, **est_metrics}),
         "grad_norm": float(gn), "lr": sched.get_last_lr()[0],
         "time/generate_s": round(t_gen, 3), "time/score_s": round(t_score, 3),
         "time/train_s": round(t_step - t_gen - t_score, 3), "time/step_s": round(t_step, 3)}
    lengths = d.gather(cmask.sum(1))
    m.update(completion_length=lengths.mean().item(), tokens_per_s=round(float(lengths.sum()) / t_step, 1))
    return m


def reward_metrics(dist, rb, group_size: int) -> dict:
    """Mean and std of the step's rewards (every rank's), the mean of each source and, with groups, the
    share of prompts whose samples all scored the same (no learning signal)."""
    total = dist.gather(rb.total.float())
    m = {"reward": total.mean().item(), "reward_std": total.std().item(),
         **{f"rewards/{k}": dist.gather(v.float()).mean().item() for k, v in rb.parts.items()}}
    if group_size > 1:
        m["frac_reward_zero_std"] = (total.view(-1, group_size).std(1) == 0).float().mean().item()
    return m


def check(cfg) -> None:
    tc = cfg.train
    if tc.num_generations < 2:
        raise ConfigError("train.num_generations: GRPO needs at least 2 completions per prompt")
    world = world_size()  # under torchrun each rank splits its share of the batch into micro-batches
    B = tc.prompts_per_step * tc.num_generations // world if tc.prompts_per_step % world == 0 else 0
    if isinstance(tc.micro_batch_size, int) and tc.micro_batch_size and B % tc.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size: {tc.micro_batch_size} does not divide the batch of {B} "
                          "(prompts_per_step x num_generations" + (f" / {world} processes)" if world > 1 else ")"))


def train_rollouts(ctx, desc: str, estimator: AdvantageEstimator = GROUP,
                   fields=("reward", "kl", "clip_ratio/region", "completion_length"), step_fn=None) -> dict:
    """The on-policy loop (GRPO, ReMax, REINFORCE++, RAFT, SuperHF): one :func:`grpo_step` per step with
    ``estimator``, or ``step_fn(ctx, step, opt, sched, rewards) -> metrics`` in its place."""
    step_fn = step_fn or partial(grpo_step, estimator=estimator)
    tc, bundle = ctx.cfg.train, ctx.bundle
    add_policy(ctx)
    rewards = reward_sources(ctx)
    opt, sched = make_optimizer(bundle.adapter_parameters(POLICY), tc.optim, tc.steps)
    start, baseline = start_or_resume(ctx, [POLICY], opt, sched)
    bundle.base.train()
    t_start = time.time()
    with Progress(tc.steps, start, fields, desc=desc, every=tc.log_every) as bar:
        for step in range(start, tc.steps):
            if tc.max_time_s and time.time() - t_start > tc.max_time_s:
                break
            m = step_fn(ctx, step, opt, sched, rewards)
            m["elapsed_s"] = round(time.time() - t_start, 2)
            end_step(ctx, tc, step + 1, m, bar, [POLICY], baseline, opt, sched)
    hist = ctx.run_dir.read_metrics()
    tail = hist[-10:]
    extra = {"steps": tc.steps, "train_reward_last10": sum(r["reward"] for r in tail) / max(1, len(tail))}
    return finish(ctx, [POLICY], baseline, extra)


def train(ctx) -> dict:
    return train_rollouts(ctx, "grpo")


register("grpo", GRPOConfig, train, check=check, shards="prompts_per_step")
