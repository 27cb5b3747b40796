"""PPO (RLHF, Hydra style): actor, critic, reward and reference as roles of one base model.

Roles on the one ``ModelBundle``: ``policy`` (LoRA actor), ``value`` (critic: its own LoRA + a scalar head,
or with ``critic: shared`` a second head on the policy adapter, Hydra's shared trunk), ``reward`` (a trained
reward adapter + head from a ``reward_model`` run, and/or reward functions), ``reference`` (adapters off, or
the frozen starting adapter). The base is loaded once; no role ever holds a copy of it.

One step (one rollout batch):
  1. sample completions from the policy (HF generate, KV cache);
  2. score them: sequence score = weighted rewards (- missing_eos_penalty; optionally normalized by running
     moments);
  3. no grad: the rollout's log-probs (policy), reference log-probs and values (critic) through the fused
     log-prob path; per-token reward = -kl_coef KL_t (+ score on the last token); GAE; whitened advantages;
  4. ``ppo_epochs`` passes of ``num_mini_batches`` optimizer steps on the clipped policy + value loss;
  5. adaptive KL coefficient (Ziegler et al. 2019) when ``adaptive_kl``.
Deterministic: all randomness of step ``s`` derives from ``(seed, s)``; the KL coefficient and reward
moments are saved with each checkpoint, so resume is exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from lowalign.algorithms import register
from lowalign.algorithms.common import (
    POLICY,
    add_policy,
    end_step,
    finish,
    make_optimizer,
    optimizer_step,
    reward_sources,
    start_or_resume,
    step_seed,
)
from lowalign.algorithms.configs import OptimConfig
from lowalign.algorithms.grpo import reward_metrics, shard_prompts
from lowalign.config import ConfigError, F, saved_adapter_dir
from lowalign.distributed import SINGLE, Dist
from lowalign.generation import generate
from lowalign.logprobs import logprobs_from_hidden
from lowalign.losses.filtering import policy_filter_mask, r_squared
from lowalign.losses.ppo import (
    RunningMoments,
    adaptive_kl_coef,
    calibrated_rewards,
    dpo_token_rewards,
    explained_variance,
    gae,
    kl_shaped_rewards,
    ppo_loss,
    whiten,
)
from lowalign.rewards import RewardSources, row_columns
from lowalign.runtime import PHASES, Progress, seed_everything

VALUE = "value"


@dataclass
class PPOConfig:
    steps: int = F(200, "PPO iterations (one rollout batch each).", ge=1)
    prompts_per_step: int = F(32, "Prompts per rollout batch.", ge=1)
    num_generations: int = F(1, "Completions per prompt (PPO needs no groups; >1 just widens the batch).", ge=1)
    max_new_tokens: int = F(8, "Completion budget.", ge=1)
    temperature: float = F(1.0, "Sampling temperature; the log-prob kernel uses the same one.", gt=0)
    top_p: float = F(1.0, "Nucleus sampling.", gt=0, le=1)
    top_k: int = F(0, "Top-k sampling (0: off).", ge=0)
    critic: Literal["separate", "shared"] = F(
        "separate", "separate: the critic is its own LoRA adapter + scalar head on the base; shared: a scalar "
        "head on the policy adapter (Hydra-RLHF's shared trunk: one forward gives log-probs and values).")
    ppo_epochs: int = F(4, "Optimization passes over each rollout batch.", ge=1)
    num_mini_batches: int = F(1, "Minibatches per pass (one optimizer step each); must divide the batch.", ge=1)
    micro_batch_size: int = F(0, "Sequences per forward/backward within a minibatch (0: the whole minibatch).", ge=0)
    clip: float = F(0.2, "Policy ratio clip range (cliprange).", gt=0, lt=1)
    value_clip: float = F(0.2, "Value clip range around the rollout's values (cliprange_value).", gt=0)
    vf_coef: float = F(0.1, "Weight of the value loss.", ge=0)
    gamma: float = F(1.0, "Discount factor of GAE.", ge=0, le=1)
    lam: float = F(0.95, "GAE lambda.", ge=0, le=1)
    kl_coef: float = F(0.05, "Coefficient of the per-token KL penalty to the reference (initial value when "
                             "adaptive_kl).", ge=0)
    kl_estimator: Literal["k1", "k3"] = F("k1", "Per-token KL in the reward: k1 = logp - ref (Ziegler et al.) "
                                               "or k3 (unbiased and >= 0).")
    adaptive_kl: bool = F(False, "Adapt kl_coef toward target_kl (Ziegler et al. 2019).")
    target_kl: float = F(6.0, "Target per-sequence KL (nats) of the adaptive controller.", gt=0)
    kl_horizon: float = F(10000.0, "Horizon of the adaptive controller (in sequences).", gt=0)
    missing_eos_penalty: float = F(0.0, "Subtracted from the score of completions that hit max_new_tokens "
                                        "without EOS (0: off).", ge=0)
    reward_norm: bool = F(False, "Normalize scores by the running mean/std of all scores seen so far.")
    whiten_advantages: bool = F(True, "Whiten advantages over the batch's valid tokens.")
    filter: Literal["none", "best_of_n", "best_random", "best_worst"] = F(
        "none", "PF-PPO (arXiv 2409.06957): of each prompt's num_generations samples, update only on the best "
        "(best_of_n), the best and one other at random (best_random), or the best and the worst (best_worst), "
        "ranked by the score. Logs filter/* (the kept samples' reward) and, when the rewards hold a learned "
        "adapter and the rows an answer, filter/r2: the R^2 of the learned reward against the checker's score "
        "on the kept samples.")
    confidence_weight: float = F(0.0, "PPO-C (arXiv 2410.09724): each score moves by weight x (c - 1/2) x (score - "
                                      "the running mean of past scores), c the confidence the completion states "
                                      "('Confidence: 0.8'); completions stating none keep their score. 0: off.",
                                 ge=0)
    confidence_parser: str = F("lowalign.rewards:verbalized_confidence",
                               "PPO-C: 'module:function' reading a completion's stated confidence, text -> float "
                               "in [0, 1] or None.")
    value_learning_rate: float = F(0.0, "Learning rate of the critic's adapter and head (0: optim.learning_rate).",
                                   ge=0)
    optim: OptimConfig = F(factory=OptimConfig, help="Optimizer and schedule (one scheduler step per PPO step).")
    checkpoint_every: int = F(50, "Save a checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = F(2, "How many recent checkpoints to keep.", ge=1)
    log_every: int = F(10, "Print a progress line every N steps when not on a terminal.", ge=1)
    max_time_s: float = F(0.0, "Stop after this much training wall time (0: no limit; for benchmarks).", ge=0)


def check(cfg) -> None:
    tc = cfg.train
    B = tc.prompts_per_step * tc.num_generations
    if not cfg.rewards:
        raise ConfigError("rewards: PPO needs at least one reward source (a function or a reward adapter)")
    if B < 2:
        raise ConfigError("train.prompts_per_step: a batch of at least 2 sequences is needed to whiten advantages")
    if tc.confidence_weight:
        from lowalign.rewards import import_reward

        import_reward(tc.confidence_parser, "train.confidence_parser")
    if tc.filter != "none":
        if tc.num_generations < 2:
            raise ConfigError(f"train.filter: {tc.filter} chooses among each prompt's samples: set "
                              "train.num_generations >= 2")
        B = tc.prompts_per_step * kept_per_prompt(tc)
        if B < 2:
            raise ConfigError("train.prompts_per_step: the filter keeps fewer than 2 sequences to whiten")
    if B % tc.num_mini_batches:
        per = "the samples train.filter keeps" if tc.filter != "none" else "num_generations"
        raise ConfigError(f"train.num_mini_batches: {tc.num_mini_batches} does not divide the batch of {B} "
                          f"(prompts_per_step x {per})")
    mb = B // tc.num_mini_batches
    if tc.micro_batch_size and mb % tc.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size: {tc.micro_batch_size} does not divide the minibatch of {mb}")


def kept_per_prompt(tc) -> int:
    """Samples per prompt the update trains on: all of them, or what train.filter keeps."""
    return {"none": tc.num_generations, "best_of_n": 1}.get(tc.filter, 2)


@dataclass
class Roles:
    """Which bundle plays each role. In lowalign they are all the same bundle; ``benchmarks/ppo_memory.py``
    passes four separately loaded ones to measure what a naive setup costs, running this same code."""

    policy: object
    value: object
    reference: object
    critic: str  # "separate" | "shared"
    dpo: tuple = ()  # RTO: (frozen DPO adapter on the reference's base, beta) per dpo_adapter reward

    @classmethod
    def shared(cls, bundle, critic: str, dpo: tuple = ()) -> Roles:
        return cls(bundle, bundle, bundle, critic, dpo)


@dataclass
class PPOState:
    """What a step carries to the next beyond weights: saved in every checkpoint (JSON-able)."""

    kl_coef: float
    moments: RunningMoments
    past_scores: RunningMoments = field(default_factory=RunningMoments)  # PPO-C's running mean of past scores


def _forward(bundle, adapter: str, roll, sl, tc, *, logps: bool, values: bool):
    """One backbone pass in role ``adapter`` on rows ``sl``: completion log-probs (B, C) and/or values (B, C)
    (the value of the state before each completion token, read from the same hidden states)."""
    P = roll.prompt_ids.shape[1]
    ids, mask = roll.input_ids[sl], roll.attention_mask[sl]
    with bundle.use(adapter):
        h = bundle.hidden_states(ids, mask)  # (b, T, d)
        lp = v = None
        if logps:
            lp = logprobs_from_hidden(bundle, h, ids, roll.target_mask[sl], temperature=tc.temperature).logps[:, P:]
        if values:
            v = bundle.heads[VALUE](h[:, P - 1:-1].float()).squeeze(-1)  # state t-1 predicts token t
    return lp, v


def policy_and_values(roles: Roles, roll, sl, tc):
    """Log-probs (policy) and values (critic) of rows ``sl``: one pass when the critic is shared."""
    if roles.critic == "shared":
        return _forward(roles.policy, POLICY, roll, sl, tc, logps=True, values=True)
    lp, _ = _forward(roles.policy, POLICY, roll, sl, tc, logps=True, values=False)
    _, v = _forward(roles.value, VALUE, roll, sl, tc, logps=False, values=True)
    return lp, v


def _backward_micro(roles: Roles, roll, rows, tc, old_lp, adv, old_v, ret, cmask, n_tokens):
    """Loss and backward of one micro-batch, its token sums over ``n_tokens`` (the minibatch's tokens on
    every rank: micro-batches and ranks add up to the minibatch's token mean). Shared critic: one forward,
    one backward. Separate critic: the policy half first (rollout values as constants), then the value half
    (log-probs as constants): the same gradients as one joint backward, but the two roles' autograd graphs
    never exist at once."""
    args = dict(clip=tc.clip, value_clip=tc.value_clip, vf_coef=tc.vf_coef, num_tokens=n_tokens)
    fixed = (adv[rows], old_v[rows], ret[rows], cmask[rows])
    if roles.critic == "shared":
        lp, v = _forward(roles.policy, POLICY, roll, rows, tc, logps=True, values=True)
        out = ppo_loss(lp, old_lp[rows], fixed[0], v, *fixed[1:], **args)
        out.loss.backward()
        return out
    lp, _ = _forward(roles.policy, POLICY, roll, rows, tc, logps=True, values=False)
    pol = ppo_loss(lp, old_lp[rows], fixed[0], old_v[rows], *fixed[1:], **args)  # value term: constant
    pol.loss.backward()
    _, v = _forward(roles.value, VALUE, roll, rows, tc, logps=False, values=True)
    out = ppo_loss(lp.detach(), old_lp[rows], fixed[0], v, *fixed[1:], **args)  # policy term: constant
    out.loss.backward()
    return out


def ppo_step(cfg, data, roles: Roles, step: int, opt, sched, rewards: RewardSources, state: PPOState,
             params: list, d: Dist = SINGLE) -> dict:
    """One PPO step; under torchrun (``d``) on this rank's share of the rollout batch, with statistics over
    the whole batch (reward moments, advantage whitening, KL) and minibatches drawn from the whole batch."""
    tc = cfg.train
    t0 = time.time()
    seed = step_seed(cfg.seed, step)
    seed_everything(seed)
    bundle = roles.policy
    G = tc.num_generations
    rows, seeds = shard_prompts(d, data.batch(step, tc.prompts_per_step, cfg.seed), G, seed)
    a = d.bounds(tc.prompts_per_step)[0] * G  # the index of this rank's first row in the whole batch
    with bundle.use(POLICY), PHASES.phase("rollout"):
        roll = generate(bundle, [r["prompt"] for r in rows], max_new_tokens=tc.max_new_tokens, do_sample=True,
                        temperature=tc.temperature, top_p=tc.top_p, top_k=tc.top_k, num_generations=G,
                        row_seeds=seeds)
    t_gen = time.time() - t0
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    with PHASES.phase("scoring"):
        rb = rewards(prompts, roll.texts, row_columns(rows, G))
    ended = (roll.completion_ids == bundle.tokenizer.eos_token_id).any(1).cpu()
    scores = rb.total - tc.missing_eos_penalty * (~ended).float()
    calibration = {}
    if tc.confidence_weight:  # PPO-C: stated confidence pays where the score beats the running mean
        from lowalign.rewards import import_reward

        parse = import_reward(tc.confidence_parser, "train.confidence_parser")
        conf = torch.tensor([float("nan") if (c := parse(t)) is None else float(c) for t in roll.texts])
        everyone = d.gather(scores.float())
        past = state.past_scores.mean if state.past_scores.count >= 1 else everyone.mean().item()
        raw, scores = scores, calibrated_rewards(scores, conf, past, tc.confidence_weight)
        state.past_scores.update(everyone)
        stated = d.gather(conf)
        stated = stated[~torch.isnan(stated)]
        calibration = {"calibration/stated_fraction": len(stated) / len(everyone),
                       "calibration/shift_mean": d.gather(scores - raw).mean().item(),
                       "calibration/running_mean": past,
                       **({"calibration/confidence_mean": stated.mean().item()} if len(stated) else {})}
    filtered = {}
    if tc.filter != "none":  # PF-PPO: the update sees only the kept samples
        noise = torch.rand(tc.prompts_per_step * G, generator=torch.Generator().manual_seed(seed + 31))
        keep = policy_filter_mask(scores, G, tc.filter, noise[a:a + len(scores)])
        filtered = filter_metrics(d, rb, rewards, scores, keep, roll.texts, row_columns(rows, G), data.checker)
        roll, scores, ended = roll.select(keep.to(roll.completion_ids.device)), scores[keep], ended[keep]
        a = d.bounds(tc.prompts_per_step)[0] * kept_per_prompt(tc)
    if tc.reward_norm:
        state.moments.update(d.gather(scores))
        scores = (scores - state.moments.mean) / (state.moments.std + 1e-8)

    cmask = roll.completion_mask.float()
    B, B_all = cmask.shape[0], cmask.shape[0] * d.world
    everything = slice(None)
    with torch.no_grad(), PHASES.phase("scoring"):
        old_lp, old_v = policy_and_values(roles, roll, everything, tc)
        ref_lp, _ = _forward(roles.reference, "reference", roll, everything, tc, logps=True, values=False)
        token_rewards, kl = kl_shaped_rewards(scores.to(cmask.device), old_lp, ref_lp, cmask, state.kl_coef,
                                              tc.kl_estimator)
        dense = torch.zeros_like(cmask)
        for name, beta in roles.dpo:  # RTO: each DPO policy's implicit reward of every sampled token
            dpo_lp, _ = _forward(roles.reference, name, roll, everything, tc, logps=True, values=False)
            dense += dpo_token_rewards(dpo_lp, ref_lp, cmask, beta)
        token_rewards = token_rewards + dense
        adv, ret = gae(token_rewards, old_v, cmask, tc.gamma, tc.lam)
        if tc.whiten_advantages:  # over every rank's tokens
            adv = d.on_whole_batch(lambda x, m: whiten(x, m) * m, adv, cmask)

    mb = B_all // tc.num_mini_batches
    micro = tc.micro_batch_size or mb
    keys = ("loss", "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl", "ratio_mean")
    agg, n_updates = dict.fromkeys(keys, 0.0), tc.ppo_epochs * tc.num_mini_batches
    for epoch in range(tc.ppo_epochs):
        # minibatches of the whole batch: the same permutation on every rank, each takes its own rows of it
        order = torch.randperm(B_all, generator=torch.Generator().manual_seed(seed + epoch))
        for s in range(0, B_all, mb):
            idx = order[s:s + mb]
            mine = (idx[(idx >= a) & (idx < a + B)] - a).to(cmask.device)
            n_tokens = d.sum(cmask[mine].sum())  # the minibatch's tokens, over every rank
            for u in range(0, len(mine), micro):
                rows_ = mine[u:u + micro]
                with PHASES.phase("forward_backward"):
                    out = _backward_micro(roles, roll, rows_, tc, old_lp, adv, old_v, ret, cmask, n_tokens)
                w = float(cmask[rows_].sum() / n_tokens.clamp(min=1.0)) / n_updates  # token share of the update
                for k in keys:  # the losses are token sums over the minibatch's count already
                    agg[k] += float(getattr(out, k).detach()) * (1.0 if k.endswith("loss") else w)
            gn = optimizer_step(d, params, opt, None, tc.optim.max_grad_norm)
    sched.step()
    agg = {k: d.sum(v) for k, v in agg.items()}
    for k in ("loss", "policy_loss", "value_loss"):  # sums of minibatch means: the mean over updates
        agg[k] /= n_updates

    seq_kl = d.gather(kl.sum(1)).mean().item()
    n_tok = d.sum(cmask.sum())
    every = d.gather(scores.float()), d.gather(token_rewards.sum(1))
    m = {"step": step + 1, **reward_metrics(d, rb, 1),  # PPO has no groups
         "score": every[0].mean().item(), "kl": seq_kl, "kl_coef": state.kl_coef,
         "non_score_reward": every[1].mean().item() - every[0].mean().item(), **agg,
         "value_mean": (d.sum((old_v * cmask).sum()) / n_tok).item(),
         "return_mean": (d.sum((ret * cmask).sum()) / n_tok).item(),
         "explained_variance": float(explained_variance(*(d.gather(x) for x in (ret, old_v, cmask)))),
         "grad_norm": float(gn), "lr": sched.get_last_lr()[0],
         "completion_length": d.gather(cmask.sum(1)).mean().item(),
         "eos_fraction": d.gather(ended.float()).mean().item(),
         "time/generate_s": round(t_gen, 3), "time/step_s": round(time.time() - t0, 3), **filtered, **calibration,
         **({"rto/dense_reward": d.gather(dense.sum(1)).mean().item()} if roles.dpo else {})}
    if tc.adaptive_kl:
        state.kl_coef = adaptive_kl_coef(state.kl_coef, seq_kl, tc.target_kl, tc.kl_horizon, B_all)
    return m


def filter_metrics(d: Dist, rb, rewards: RewardSources, scores, keep, texts, columns, checker) -> dict:
    """PF-PPO's numbers over the whole batch: the kept samples' score (mean, std) next to all samples', the
    share kept and, when the rewards hold a learned adapter and the rows an answer, ``filter/r2``: the R^2
    between the learned reward and the checker's score on the kept samples (the paper's criterion for how far
    the learned reward can be trusted where the update looks)."""
    every, kept = d.gather(scores.float()), d.gather(scores.float()[keep])
    m = {"filter/score_kept_mean": kept.mean().item(), "filter/score_kept_std": kept.std().item(),
         "filter/score_all_mean": every.mean().item(), "filter/kept_fraction": len(kept) / len(every)}
    learned = [(n, w) for n, w, _fn, adapter in rewards.sources if adapter is not None]
    if learned and checker is not None and "answer" in columns:
        lr = sum(w * rb.parts[n].float() for n, w in learned)
        truth = torch.tensor([float(checker(t, a)) for t, a in zip(texts, columns["answer"])])
        m["filter/r2"] = float(r_squared(d.gather(lr[keep]), d.gather(truth[keep])))
    return m


def add_critic(bundle, cfg) -> list:
    """The critic's trainable parameters: its own LoRA + head, or just a head on the policy adapter."""
    if cfg.train.critic == "separate":
        bundle.add_adapter(VALUE, cfg.lora)
    head = bundle.add_head(VALUE, 1)
    torch.nn.init.zeros_(head.weight)  # V = 0 at the start: the first advantages are the rewards themselves
    return (bundle.adapter_parameters(VALUE) if cfg.train.critic == "separate" else []) + list(head.parameters())


def add_dpo_roles(bundle, cfg) -> tuple:
    """RTO: each ``rewards: [{dpo_adapter: <DPO run>}]`` becomes a frozen adapter on the same base (the fifth
    role); returns (adapter name, beta) pairs."""
    from lowalign.bundle import saved_lora_config

    roles = []
    for i, spec in enumerate(cfg.rewards):
        if spec.dpo_adapter is not None:
            name, d = f"dpo{i}", saved_adapter_dir(spec.dpo_adapter, f"rewards[{i}].dpo_adapter")
            bundle.add_adapter(name, saved_lora_config(d), init_from=str(d))
            bundle.freeze_adapter(name)
            roles.append((name, spec.weight))
    return tuple(roles)


def param_groups(bundle, cfg, vparams) -> list[dict]:
    tc = cfg.train
    vlr = tc.value_learning_rate or tc.optim.learning_rate
    return [{"params": bundle.adapter_parameters(POLICY)}, {"params": vparams, "lr": vlr}]


def train(ctx) -> dict:
    cfg, tc, bundle = ctx.cfg, ctx.cfg.train, ctx.bundle
    add_policy(ctx)
    vparams = add_critic(bundle, cfg)
    dpo = add_dpo_roles(bundle, cfg)
    rewards = reward_sources(ctx)
    groups = param_groups(bundle, cfg, vparams)
    params = [p for g in groups for p in g["params"]]
    opt, sched = make_optimizer(groups, tc.optim, tc.steps)
    adapters = [POLICY] + ([VALUE] if tc.critic == "separate" else [])
    start, baseline = start_or_resume(ctx, adapters, opt, sched)
    extra = (ctx.resumed_state or {}).get("extra") or {}
    state = PPOState(extra.get("kl_coef", tc.kl_coef), RunningMoments(**extra.get("moments", {})),
                     RunningMoments(**extra.get("past_scores", {})))
    roles = Roles.shared(bundle, tc.critic, dpo)
    bundle.base.train()
    fields = ("reward", "kl", "value_loss", "explained_variance")
    t_start = time.time()
    with Progress(tc.steps, start, fields, desc="ppo", every=tc.log_every) as bar:
        for step in range(start, tc.steps):
            if tc.max_time_s and time.time() - t_start > tc.max_time_s:
                break
            m = ppo_step(cfg, ctx.data, roles, step, opt, sched, rewards, state, params, ctx.dist)
            m["elapsed_s"] = round(time.time() - t_start, 2)
            end_step(ctx, tc, step + 1, m, bar, adapters, baseline, opt, sched,
                     extra={"kl_coef": state.kl_coef, "moments": state.moments.state(),
                            "past_scores": state.past_scores.state()})
    tail = ctx.run_dir.read_metrics()[-10:]
    summary_extra = {"steps": tc.steps, "critic": tc.critic, "final_kl_coef": state.kl_coef,
                     "train_reward_last10": sum(r["reward"] for r in tail) / max(1, len(tail))}
    return finish(ctx, adapters, baseline, summary_extra)


register("ppo", PPOConfig, train, check=check, shards="prompts_per_step")
