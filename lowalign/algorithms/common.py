"""Small pieces every trainer uses: optimizer/schedule, evaluation, resume, final save."""

from __future__ import annotations

import math
import weakref

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


def flat_views(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One zeroed buffer per (device, dtype) of ``params`` and, per parameter, a view of it shaped like it."""
    by_kind: dict = {}
    for p in params:
        by_kind.setdefault((p.device, p.dtype), []).append(p)
    flats, views = [], {}
    for (device, dtype), ps in by_kind.items():
        flat = torch.zeros(sum(p.numel() for p in ps), device=device, dtype=dtype)
        flats.append(flat)
        off = 0
        for p in ps:
            views[id(p)] = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
    return flats, [views[id(p)] for p in params]


class FlatGrads:
    """The trainable parameters' gradients as views of one zeroed buffer per (device, dtype), allocated once.

    Why: left to autograd, each LoRA factor's gradient is a fresh ~100 KB tensor allocated in the middle of the
    first backward and freed after every optimizer step. On a CPU those small blocks land all over glibc's heap
    and pin it (SmolLM2, DPO, 4 pairs, in a one-off script: the process peak over 4 steps 1655 MiB, ~1410 with
    flat gradients and moments; ``benchmarks/RESULTS.md``, "The CPU heap, again"). With ``p.grad`` already
    defined, autograd adds into it in place, so the buffer stays where it was put.

    Semantics stay those of ``zero_grad(set_to_none=True)``: a parameter that no backward reached since the last
    step has ``grad = None`` while the optimizer steps (AdamW skips it; ``sync_grads`` counts it as absent)."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.flats, self.views = flat_views(self.params)
        self.touched: set[int] = set()
        me = weakref.ref(self)  # the hooks outlive an optimizer that is dropped while its parameters live on
        for p in self.params:
            p.register_post_accumulate_grad_hook(lambda q: me() and me().touched.add(id(q)))
        self.reset()

    def drop_untouched(self) -> None:
        """Before the step: ``grad = None`` for every parameter no backward reached since :meth:`reset`."""
        for p in self.params:
            if id(p) not in self.touched:
                p.grad = None

    def reset(self) -> None:
        """After the step: every gradient back to its zeroed view (what ``zero_grad`` would have freed)."""
        for p, v in zip(self.params, self.views):
            if p.grad is not v:
                p.grad = v
        for flat in self.flats:
            flat.zero_()
        self.touched.clear()


class AdamW(torch.optim.AdamW):
    """torch's AdamW whose gradients (:class:`FlatGrads`, cleared by :func:`optimizer_step`) and moment
    estimates live in flat buffers allocated before the first step, for the reason ``FlatGrads`` gives. The
    state is torch's own (``step``, ``exp_avg``, ``exp_avg_sq``, created here instead of at the first step;
    a loaded state dict is copied into the buffers), so updates and checkpoints are unchanged."""

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.flat_grads = FlatGrads(p for g in self.param_groups for p in g["params"])
        self.moments = {k: flat_views(self.flat_grads.params)[1] for k in self.MOMENTS}
        self._adopt_state()
        self.register_load_state_dict_post_hook(lambda opt: opt._adopt_state())

    def _adopt_state(self) -> None:
        for i, p in enumerate(self.flat_grads.params):
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64
                                          else torch.float32)  # what torch's first step creates
            else:  # loaded: torch keeps the caller's step tensor, and steps add to it in place
                st["step"] = st["step"].clone()
            for k in self.MOMENTS:
                v = self.moments[k][i]
                if k in st and st[k] is not v:
                    v.copy_(st[k])
                st[k] = v


def make_optimizer(params, oc, total_steps: int):
    opt = AdamW(params, lr=oc.learning_rate, weight_decay=oc.weight_decay, betas=(0.9, 0.99))

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
    ``opt`` comes from :func:`make_optimizer` (its gradients are :class:`FlatGrads`). Returns the gradient norm
    before clipping."""
    with PHASES.phase("optimizer"):
        opt.flat_grads.drop_untouched()
        dist.sync_grads(params)
        gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
        opt.step()
        if sched is not None:
            sched.step()
        opt.flat_grads.reset()
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
