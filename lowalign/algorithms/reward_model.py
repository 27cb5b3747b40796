"""Reward model on the shared base: a ``reward`` LoRA adapter plus a scalar (or multi-output) head.

Objectives (``lowalign.losses``):
* ``bradley_terry``: -log sigma(r_c - r_r - margin) on preference pairs;
* ``regression``: the task's scored attributes (correctness, format, length) regressed by a 3-output
  head; the reward is their weighted sum (multi-objective reward models, as in multi-objective GRPO).
The result (adapter + head + reward_meta.json) plugs into GRPO as ``rewards: [{adapter: reward, path: RUN}]``.
"""

from __future__ import annotations

import torch

from lowalign.algorithms import register
from lowalign.algorithms.common import end_step, finish, make_optimizer, start_or_resume, step_seed
from lowalign.algorithms.configs import RewardModelConfig
from lowalign.algorithms.pairs import encode_pairs, pair_batch, run_pairs
from lowalign.config import ConfigError
from lowalign.losses import bradley_terry_loss, multi_objective_loss
from lowalign.preference import ATTRIBUTES, attributes
from lowalign.runtime import Progress, atomic_write_text, seed_everything


def _scores(bundle, name, pairs):
    """Head outputs for chosen then rejected completions: (2B, K)."""
    b = encode_pairs(bundle, pairs)
    return bundle.score(name, b.input_ids, b.attention_mask, b.target_mask)


def _targets(pairs):
    side = [(p["prompt"], p["chosen"], p["answer"]) for p in pairs] + \
           [(p["prompt"], p["rejected"], p["answer"]) for p in pairs]
    return attributes(side)


@torch.no_grad()
def pairwise_eval(ctx, pairs, batch_size: int = 128) -> dict:
    tc, bundle = ctx.cfg.train, ctx.bundle
    name = tc.adapter_name
    w = bundle.head_weights.get(name)
    hits, err, n_err = 0, 0.0, 0
    with bundle.use(name), bundle.eval_mode():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            n = len(chunk)
            out = _scores(bundle, name, chunk).cpu()
            r = out @ w if w is not None else out[:, 0]
            hits += int((r[:n] > r[n:]).sum())
            if tc.objective == "regression" and "answer" in chunk[0]:
                err = err + (out - _targets(chunk)).abs().sum(0)
                n_err += 2 * n
    res = {"pairwise_accuracy": hits / max(1, len(pairs))}
    if n_err:
        res.update({f"mae/{a}": float(e) / n_err for a, e in zip(ATTRIBUTES, err)})
    return res


def check(cfg) -> None:
    tc = cfg.train
    if tc.objective == "regression" and len(tc.attribute_weights) != len(ATTRIBUTES):
        raise ConfigError(f"train.attribute_weights: need {len(ATTRIBUTES)} weights for {ATTRIBUTES}")


def train(ctx) -> dict:
    cfg, tc, bundle = ctx.cfg, ctx.cfg.train, ctx.bundle
    name = tc.adapter_name
    K = len(ATTRIBUTES) if tc.objective == "regression" else 1
    bundle.add_adapter(name, cfg.lora, init_from=cfg.lora.init_from)
    bundle.add_head(name, K)
    if tc.likelihood_feature:
        bundle.add_likelihood_feature(name)
    if K > 1:
        bundle.head_weights[name] = torch.tensor(tc.attribute_weights, dtype=torch.float32)
    data = run_pairs(ctx, tc, role="reference")  # pairs sampled from the base model itself
    if tc.objective == "regression" and "answer" not in data.train[0]:
        raise ConfigError("train.objective: 'regression' needs scored attributes (built-in task data)")
    params = bundle.adapter_parameters(name) + [p for k, h in bundle.heads.items()
                                                if k == name or k.startswith(f"{name}__") for p in h.parameters()]
    opt, sched = make_optimizer(params, tc.optim, tc.steps)
    evaluate_fn = lambda c: pairwise_eval(c, data.eval)
    start, baseline = start_or_resume(ctx, [name], opt, sched, evaluate_fn=evaluate_fn)
    bundle.base.train()
    wt = torch.tensor(tc.attribute_weights, device=bundle.device)
    with Progress(tc.steps, start, ("loss", "accuracy"), desc="reward model", every=tc.log_every) as bar:
        for step in range(start, tc.steps):
            seed_everything(step_seed(cfg.seed, step))
            pairs = [data.train[i] for i in pair_batch(data.train, step, tc.batch_size, cfg.seed)]
            n = len(pairs)
            with bundle.use(name):
                out = _scores(bundle, name, pairs)
            if tc.objective == "bradley_terry":
                lo = bradley_terry_loss(out[:n, 0], out[n:, 0], margin=tc.margin)
            else:
                lo = multi_objective_loss(out, _targets(pairs).to(out), wt)
                r = out.detach() @ wt
                lo.metrics["accuracy"] = (r[:n] > r[n:]).float().mean()
            lo.loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, tc.optim.max_grad_norm or float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            m = {"step": step + 1, "loss": lo.loss.item(), **{str(k): float(v) for k, v in lo.metrics.items()},
                 "grad_norm": float(gn), "lr": sched.get_last_lr()[0]}
            end_step(ctx, tc, step + 1, m, bar, [name], baseline, opt, sched, evaluate_fn=evaluate_fn)
    summary = finish(ctx, [name], baseline, {"steps": tc.steps, "pairs": len(data.train)}, evaluate_fn)
    meta = {"adapter": name, "objective": tc.objective, "attributes": list(ATTRIBUTES) if K > 1 else ["reward"],
            "weights": tc.attribute_weights if K > 1 else None}
    import json

    atomic_write_text(ctx.run_dir.path / "adapters" / "reward_meta.json", json.dumps(meta, indent=1))
    return summary


register("reward_model", RewardModelConfig, train, data="preferences", check=check)
