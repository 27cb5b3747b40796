"""Reward model on the shared base: a ``reward`` LoRA adapter plus a scalar (or multi-output) head.

Objectives (``lowalign.losses``):
* ``bradley_terry``: -log sigma(r_c - r_r - margin) on preference pairs;
* ``regression``: scored attributes regressed by a K-output head, the reward their weighted sum
  (multi-objective reward models, as in multi-objective GRPO): on the built-in task, the correctness,
  format and length of its pairs' completions; on a rating file (``data.path``), the numeric columns named
  by ``train.attributes`` of rows ``{prompt, completion, <attribute>...}``.
The result (adapter + head + reward_meta.json naming the attributes) plugs into GRPO as
``rewards: [{adapter: reward, path: RUN, attribute_weights: {name: w}}]``, each attribute logged.
"""

from __future__ import annotations

import torch

from lowalign.algorithms import register
from lowalign.algorithms.common import end_step, finish, make_optimizer, optimizer_step, start_or_resume, step_seed
from lowalign.algorithms.configs import RewardModelConfig
from lowalign.algorithms.pairs import encode_pairs, pair_batch, run_pairs
from lowalign.config import ConfigError
from lowalign.losses import LossOutput, bradley_terry_loss, multi_objective_loss, within_prompt_ranking_loss
from lowalign.preference import ATTRIBUTES, PreferenceData, attributes, confidence_pairs
from lowalign.runtime import PHASES, Progress, seed_everything


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


@torch.no_grad()
def rating_eval(ctx, rows, names: list[str], batch_size: int = 128) -> dict:
    """Held-out ratings: mean absolute error and Pearson correlation of each attribute, the correlation of the
    weighted reward with the weighted true scores, and ``pairwise_accuracy``: over every two completions of
    one held-out prompt with different true rewards, the share the reward orders rightly (what a
    group-normalized trainer such as GRPO reads)."""
    bundle, name = ctx.bundle, ctx.cfg.train.adapter_name
    with bundle.use(name), bundle.eval_mode():
        pred = torch.cat([_rating_scores(bundle, name, rows[s:s + batch_size]).cpu()
                          for s in range(0, len(rows), batch_size)])
    true = torch.tensor([r["scores"] for r in rows])
    w = bundle.head_weights[name]

    def corr(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12))

    rp, rt = pred @ w, true @ w
    groups = prompt_groups(rows)
    gid = torch.tensor([g for g, idx in enumerate(groups) for _ in idx])
    order = [i for idx in groups for i in idx]
    acc = within_prompt_ranking_loss(rp[order], rt[order], gid).metrics["rank_accuracy"]
    res = {"pairwise_accuracy": float(acc.nan_to_num(0.0)), "reward_corr": corr(rp, rt)}
    for i, a in enumerate(names):
        res[f"mae/{a}"] = float((pred[:, i] - true[:, i]).abs().mean())
        res[f"corr/{a}"] = corr(pred[:, i], true[:, i])
    return res


def prompt_groups(rows: list[dict]) -> list[list[int]]:
    """Indices of the rows of each distinct prompt, in first-seen order."""
    by_prompt: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_prompt.setdefault(r["prompt"], []).append(i)
    return list(by_prompt.values())


def _rating_scores(bundle, name, rows):
    """Head outputs of rated completions: (B, K)."""
    from lowalign.generation import encode_completions

    b = encode_completions(bundle.tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                           bundle.device)
    return bundle.score(name, b.input_ids, b.attention_mask, b.target_mask)


def groups_per_step(tc, rows: list[dict], groups: list[list[int]]) -> int:
    """Prompts per step on a rating file: about ``batch_size`` rows, whole prompts."""
    return max(1, tc.batch_size * len(groups) // len(rows))


def check_data(cfg, data) -> None:
    """Under torchrun, a rating file's prompts per step split evenly over the ranks."""
    from lowalign.distributed import world_size

    world = world_size()
    if not cfg.train.attributes or world == 1:
        return
    groups = prompt_groups(data.pairs.train)
    k = groups_per_step(cfg.train, data.pairs.train, groups)
    if k % world:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} rows per step are {k} whole prompts of the "
                          f"rating file, which do not split over {world} processes; pick a batch_size whose "
                          f"prompts do (about {len(data.pairs.train) / len(groups):.1f} rows per prompt)")


def check(cfg) -> None:
    tc = cfg.train
    names = tc.attributes or ATTRIBUTES
    if tc.attributes and tc.objective != "regression":
        raise ConfigError("train.attributes: a rating file's scores are regressed; set train.objective=regression")
    if len(set(tc.attributes)) != len(tc.attributes):
        raise ConfigError(f"train.attributes: {tc.attributes} names a column twice")
    if tc.confidence_pairs and (tc.objective != "bradley_terry" or tc.attributes):
        raise ConfigError("train.confidence_pairs: PPO-M's confidence pairs train a bradley_terry reward model on "
                          "pairs (set train.objective=bradley_terry, no train.attributes)")
    if tc.objective == "regression" and len(tc.attribute_weights) != len(names):
        raise ConfigError(f"train.attribute_weights: {len(tc.attribute_weights)} weights for the "
                          f"{len(names)} attributes {list(names)}")


def train(ctx) -> dict:
    cfg, tc, bundle = ctx.cfg, ctx.cfg.train, ctx.bundle
    name = tc.adapter_name
    ratings = bool(tc.attributes)  # a rating file's rows {prompt, completion, scores}, not pairs
    names = list(tc.attributes or ATTRIBUTES) if tc.objective == "regression" else []
    K = max(1, len(names))
    bundle.add_adapter(name, cfg.lora, init_from=cfg.lora.init_from)
    bundle.add_head(name, K)
    if tc.likelihood_feature:
        bundle.add_likelihood_feature(name)
    if K > 1:
        bundle.head_weights[name] = torch.tensor(tc.attribute_weights, dtype=torch.float32)
        bundle.head_attributes[name] = names
    if ratings:
        data = ctx.data.pairs
        groups = prompt_groups(data.train)
        ctx.console.print(f"ratings: {len(data.train)} train, {len(data.eval)} held-out; attributes {names}")
        evaluate_fn = lambda c: rating_eval(c, data.eval, names)
    else:
        data = run_pairs(ctx, tc, role="reference")  # pairs sampled from the base model itself
        if tc.objective == "regression" and "answer" not in data.train[0]:
            raise ConfigError("train.objective: 'regression' on pairs needs the built-in task's scored attributes; "
                              "for your own scores use a rating file and train.attributes")
        evaluate_fn = lambda c: pairwise_eval(c, data.eval)
        if tc.confidence_pairs:  # PPO-M
            data = PreferenceData(confidence_pairs(data.train, cfg.seed), data.eval)
            held = confidence_pairs(data.eval, cfg.seed + 1)[len(data.eval):]
            evaluate_fn = lambda c: {**pairwise_eval(c, data.eval), **{
                f"confidence_{k}": v for k, v in pairwise_eval(c, held).items()}}
    # Bradley-Terry sees only score differences: the heads' biases get no gradient but float noise, which Adam
    # would blow up to lr-sized steps; they stay at 0 (in the regression objective they are fitted)
    heads = [h for k, h in bundle.heads.items() if k == name or k.startswith(f"{name}__")]
    for h in heads if tc.objective == "bradley_terry" else []:
        h.bias.requires_grad_(False)
    params = bundle.adapter_parameters(name) + [p for h in heads for p in h.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, tc.optim, tc.steps)
    start, baseline = start_or_resume(ctx, [name], opt, sched, evaluate_fn=evaluate_fn)
    bundle.base.train()
    wt = torch.tensor(tc.attribute_weights, device=bundle.device)
    fields = ("loss", "rank_accuracy") if ratings else ("loss", "accuracy")
    d = ctx.dist
    with Progress(tc.steps, start, fields, desc="reward model", every=tc.log_every) as bar:
        for step in range(start, tc.steps):
            seed_everything(step_seed(cfg.seed, step))
            if ratings:  # whole prompts, so the ranking term sees every completion of each
                pick = d.shard(pair_batch(groups, step, groups_per_step(tc, data.train, groups), cfg.seed))
                pairs = [data.train[i] for g in pick for i in groups[g]]
                gid = torch.tensor([g for g in pick for _ in groups[g]], device=bundle.device)
            else:
                pairs = d.shard([data.train[i] for i in pair_batch(data.train, step, tc.batch_size, cfg.seed)])
            n = len(pairs)
            with bundle.use(name), PHASES.phase("forward_backward"):
                out = _rating_scores(bundle, name, pairs) if ratings else _scores(bundle, name, pairs)
            if ratings:  # each term is a mean over the whole step's rows / ranked pairs, on any number of ranks
                target = torch.tensor([r["scores"] for r in pairs]).to(out)
                lo = multi_objective_loss(out, target, wt)
                rank = within_prompt_ranking_loss(out @ wt, target @ wt, gid)
                pairs_here, acc = float(rank.metrics["rank_pairs"]), rank.metrics["rank_accuracy"].nan_to_num(0.0)
                counts = torch.tensor([n, pairs_here, float(rank.loss) * pairs_here, float(acc) * pairs_here],
                                      dtype=torch.float64)
                n_rows, n_rank, rank_loss_sum, hits = d.sum(counts).tolist()  # one all-reduce
                loss = lo.loss * n / n_rows + tc.rank_weight * rank.loss * pairs_here / max(n_rank, 1.0)
                lo = LossOutput(loss, {**d.mean(lo.metrics, weight=n), "rank_loss": rank_loss_sum / max(n_rank, 1.0),
                                       "rank_accuracy": hits / n_rank if n_rank else float("nan")})
            else:  # means over this rank's pairs, an equal share of the step's
                if tc.objective == "bradley_terry":
                    lo = bradley_terry_loss(out[:n, 0], out[n:, 0], margin=tc.margin)
                else:
                    lo = multi_objective_loss(out, _targets(pairs).to(out), wt)
                    r = out.detach() @ wt
                    lo.metrics["accuracy"] = (r[:n] > r[n:]).float().mean()
                lo = LossOutput(lo.loss / d.world, d.mean({k: float(v) for k, v in lo.metrics.items()}))
            with PHASES.phase("forward_backward"):
                lo.loss.backward()
            gn = optimizer_step(d, params, opt, sched, tc.optim.max_grad_norm)
            named = {f"mae/{names[int(k[4:])]}" if k.startswith("mae/") else k: v for k, v in lo.metrics.items()}
            m = {"step": step + 1, "loss": d.sum(lo.loss.item()), **{k: float(v) for k, v in named.items()},
                 "grad_norm": float(gn), "lr": sched.get_last_lr()[0]}
            end_step(ctx, tc, step + 1, m, bar, [name], baseline, opt, sched, evaluate_fn=evaluate_fn)
    summary = finish(ctx, [name], baseline, {"steps": tc.steps, ("ratings" if ratings else "pairs"): len(data.train)},
                     evaluate_fn)
    meta = {"adapter": name, "objective": tc.objective, "attributes": names if K > 1 else ["reward"],
            "weights": tc.attribute_weights if K > 1 else None}
    import json

    ctx.run_dir.write_text("adapters/reward_meta.json", json.dumps(meta, indent=1))
    return summary


register("reward_model", RewardModelConfig, train, check=check,
         data=lambda cfg: "ratings" if cfg.train.attributes else "preferences", check_data=check_data,
         shards="batch_size")
