"""Small pieces every trainer uses: optimizer/schedule, evaluation, resume, final save."""

from __future__ import annotations

import math

import torch

from lowalign.config import reference_mode
from lowalign.evaluation import heldout_eval
from lowalign.runtime import PHASES

POLICY = "policy"


def add_policy(ctx, name: str = POLICY) -> None:
    """The policy adapter (fresh, from ``lora.init_from``, or LoftQ's start) and, with ``reference: init``, the
    frozen starting adapter as the reference role (the KL/DPO reference is where the policy starts); with
    ``reference: soup``, the average of ``reference_soup``'s adapters."""
    cfg = ctx.cfg
    ctx.bundle.add_adapter(name, cfg.lora, init_from=cfg.lora.init_from)
    if reference_mode(cfg) == "init" and cfg.lora.init_from:
        ctx.bundle.set_reference_adapter(cfg.lora.init_from)
    elif reference_mode(cfg) == "init":  # lora.init: loftq: the computed start, frozen
        ctx.bundle.freeze_copy(name)
    elif reference_mode(cfg) == "soup":
        ctx.bundle.set_reference_soup(cfg.reference_soup)


def make_optimizer(params, oc, total_steps: int):
    opt = torch.optim.AdamW(params, lr=oc.learning_rate, weight_decay=oc.weight_decay, betas=(0.9, 0.99))

    def factor(step: int) -> float:
        if oc.warmup_steps and step < oc.warmup_steps:
            return (step + 1) / oc.warmup_steps
        frac = (step - oc.warmup_steps) / max(1, total_steps - oc.warmup_steps)
        if oc.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        if oc.schedule == "linear":
            return max(0.0, 1 - frac)
        return 1.0

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(dist, params, opt, sched, max_grad_norm: float) -> torch.Tensor:
    """The end of every update: gradients summed over torchrun ranks, clipped (0: no clipping), the optimizer
    and (when given) the schedule stepped, gradients cleared; the ``optimizer`` phase of ``--profile-memory``.
    Returns the gradient norm before clipping."""
    with PHASES.phase("optimizer"):
        dist.sync_grads(params)
        gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
    return gn


def reward_sources(ctx):
    """The run's weighted reward sources; each learned reward (``rewards: [{adapter, path}]``) becomes one
    more frozen adapter + head on the same base first."""
    from lowalign.rewards import RewardSources

    for spec in ctx.cfg.rewards:
        if spec.adapter is not None and spec.adapter not in ctx.bundle.adapter_configs:
            ctx.bundle.load_reward(spec.adapter, spec.path)
        if spec.attribute_weights is not None:
            ctx.bundle.set_attribute_weights(spec.adapter, spec.attribute_weights)
    data = getattr(ctx, "data", None)
    checker = getattr(data, "checker", None)  # the run's answer checker, for correctness
    return RewardSources(ctx.cfg.rewards, scorer=ctx.bundle.score_attributes, checker=checker,
                         view=getattr(data, "view", None))


def evaluate(ctx, role: str = POLICY) -> dict:
    """Held-out metrics of ``role``: mean reward of greedy completions (per source and weighted total) when
    the run has rewards, accuracy when the task has an answer checker (see ``heldout_eval``)."""
    from lowalign.rewards import RewardSources

    e = ctx.cfg.eval
    rewards = None
    if ctx.cfg.rewards:
        rewards = RewardSources(ctx.cfg.rewards, scorer=ctx.bundle.score_attributes, checker=ctx.data.checker,
                                view=ctx.data.view)
    return heldout_eval(ctx.bundle, ctx.data.eval_rows(e.num_examples), checker=ctx.data.checker, rewards=rewards,
                        batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, role=role, sampled=e.sampled,
                        temperature=e.temperature)


def eval_metrics(ctx, evaluate_fn=None) -> dict:
    """The numbers of a periodic held-out evaluation, as ``eval/<metric>`` log fields."""
    return {f"eval/{k}": v for k, v in (evaluate_fn or evaluate)(ctx).items() if isinstance(v, float)}


def start_or_resume(ctx, adapters, optimizer, scheduler, evaluate_fn=None) -> tuple[int, dict]:
    """Returns (start step, baseline metrics). Evaluates the baseline on a fresh run; on resume restores
    adapters, optimizer, scheduler and RNG state and drops metrics rows past the checkpoint."""
    if ctx.cfg.resume:
        found = ctx.checkpointer.resume(ctx.bundle, adapters, optimizer, scheduler, ctx.console)
        if found is not None:
            ckpt, state = found
            ctx.run_dir.truncate_metrics(state["step"])
            ctx.console.print(f"resumed from {ckpt} (step {state['step']})", soft_wrap=True)
            ctx.resumed_state = state
            if ctx.on_resumed:
                ctx.on_resumed(state["step"])
            return state["step"], state["baseline"]
        ctx.console.print("[yellow]resume: no checkpoint yet, starting from step 0[/]")
        if ctx.on_resumed:
            ctx.on_resumed(0)
    ctx.run_dir.truncate_metrics(0)
    with PHASES.phase("evaluation"):
        baseline = (evaluate_fn or evaluate)(ctx)
    PHASES.step_metrics()  # load and baseline evaluation go to summary.json, not to step 1's row
    ctx.run_dir.write_json("baseline.json", baseline)
    shown = {k: round(v, 4) for k, v in baseline.items() if isinstance(v, float)}
    ctx.console.print(f"baseline (held-out): {shown}")
    return 0, baseline


def step_seed(seed: int, step: int) -> int:
    """Seed for everything random inside one step: a pure function of (seed, step), so a resumed run
    draws exactly what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


def finish(ctx, adapters: list[str], baseline: dict, extra: dict | None = None, evaluate_fn=None) -> dict:
    with PHASES.phase("evaluation"):
        final = (evaluate_fn or evaluate)(ctx)
    for name in adapters if ctx.run_dir.writer else []:
        ctx.bundle.save_adapter(name, ctx.run_dir.path / "adapters" / name)
    if len(ctx.bundle.heads) and ctx.run_dir.writer:
        ctx.bundle.save_heads(ctx.run_dir.path / "adapters" / "heads.safetensors")
    return {"baseline": {k: v for k, v in baseline.items() if k != "samples"},
            "final": {k: v for k, v in final.items() if k != "samples"},
            "final_samples": final.get("samples", []), "memory": ctx.bundle.memory_report(), **(extra or {})}


def end_step(ctx, tc, done: int, m: dict, bar, adapters: list[str], baseline: dict, optimizer=None, scheduler=None,
             extra: dict | None = None, evaluate_fn=None, total: int | None = None) -> None:
    """After step ``done`` (1-based) of ``total`` (default ``tc.steps``): the periodic held-out evaluation
    (``eval.every``), the metrics row, the progress bar and, when due, the checkpoint."""
    every = ctx.cfg.eval.every
    if every and done % every == 0 and done < (total or tc.steps):
        with PHASES.phase("evaluation"):
            m.update(eval_metrics(ctx, evaluate_fn))
    m.update(PHASES.step_metrics())
    ctx.run_dir.log(m)
    bar.update(done, m)
    maybe_checkpoint(ctx, tc, done, adapters, baseline, optimizer, scheduler, extra)


def maybe_checkpoint(ctx, tc, done: int, adapters: list[str], baseline: dict, optimizer=None, scheduler=None,
                     extra: dict | None = None) -> None:
    """Checkpoint after ``done`` steps when ``tc.checkpoint_every`` says so."""
    if tc.checkpoint_every and done % tc.checkpoint_every == 0:
        ctx.checkpointer.keep = tc.keep_checkpoints
        ctx.checkpointer.save(done, ctx.bundle, adapters, {"baseline": baseline}, optimizer, scheduler, extra)
