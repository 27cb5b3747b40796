"""Preference data for a run (pairs, or KTO's unpaired feedback rows: built or loaded once and stored in the run
directory so resume reuses them), sequence log-probs, cached reference log-probs, and the training loop the
preference algorithms share (DPO, ORPO, SimPO, TDPO, KTO)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lowalign.algorithms.common import (
    POLICY,
    add_policy,
    end_step,
    evaluate,
    finish,
    make_optimizer,
    optimizer_step,
    start_or_resume,
    step_seed,
)
from lowalign.config import reference_mode
from lowalign.data import epoch_indices
from lowalign.preference import PreferenceData, builtin_pairs, eval_pairs, load_file_pairs, pairs_to_feedback
from lowalign.runtime import PHASES, Progress, atomic_write, seed_everything

# ---- data --------------------------------------------------------------------------------------------------


def run_pairs(ctx, tc, role: str = "reference") -> PreferenceData:
    cfg = ctx.cfg
    f = ctx.run_dir.path / "pairs.json"
    if f.exists():
        blob = json.loads(f.read_text())
        return PreferenceData(blob["train"], blob["eval"])
    if ctx.data.pairs is not None:
        data = ctx.data.pairs
    elif ctx.data.task is not None:
        ctx.console.print(f"building {cfg.data.num_pairs} '{cfg.data.pairs}' preference pairs ...")
        train = builtin_pairs(cfg.data.pairs, ctx.data.task, cfg.data.num_pairs, cfg.seed, bundle=ctx.bundle,
                              samples=tc.onpolicy_samples, max_new_tokens=tc.max_new_tokens, role=role,
                              render=ctx.data.render, checker=ctx.data.checker)
        data = PreferenceData(train, eval_pairs(ctx.data.task, tc.eval_pairs, cfg.seed + 7, ctx.data.render))
    else:
        data = load_file_pairs(cfg.data, ctx.bundle.tokenizer, cfg.seed, tc.eval_pairs)
    if not data.train:
        from lowalign.data import DataError

        raise DataError("no preference pairs to train on")
    ctx.run_dir.write_text(f.name, json.dumps({"train": data.train, "eval": data.eval}))
    ctx.console.print(f"preference pairs: {len(data.train)} train, {len(data.eval)} held-out")
    return data


def run_feedback(ctx, tc, role: str = "reference") -> PreferenceData:
    """KTO's rows: the file's ``{prompt, completion, label}`` rows, or on the built-in task its pairs split
    into a desirable and an undesirable row each."""
    f = ctx.run_dir.path / "feedback.json"
    if f.exists():
        blob = json.loads(f.read_text())
        return PreferenceData(blob["train"], blob["eval"])
    if ctx.data.pairs is not None:
        data = ctx.data.pairs
    else:
        pairs = run_pairs(ctx, tc, role)
        data = PreferenceData(pairs_to_feedback(pairs.train), pairs_to_feedback(pairs.eval))
    ctx.run_dir.write_text(f.name, json.dumps({"train": data.train, "eval": data.eval}))
    good = sum(r["label"] for r in data.train)
    ctx.console.print(f"feedback rows: {len(data.train)} train ({good} desirable), {len(data.eval)} held-out")
    return data


def pair_batch(pairs: list[dict], step: int, n: int, seed: int) -> list[int]:
    """Indices of the pairs for ``step``: epochs of a seeded permutation, a pure function of step."""
    return epoch_indices(len(pairs), step, n, seed)


def pair_columns(pairs: list[dict]) -> tuple[list[str], list[str]]:
    """Prompts and completions of 2B rows: every pair's chosen completion, then every rejected one."""
    return [p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]


def encode_pairs(bundle, pairs: list[dict]):
    """One teacher-forcing batch of 2B rows (:func:`pair_columns`)."""
    from lowalign.generation import encode_completions

    return encode_completions(bundle.tokenizer, *pair_columns(pairs), bundle.device)


# ---- log-probs ---------------------------------------------------------------------------------------------


def completion_logps(bundle, prompts: list[str], completions: list[str]):
    """Summed completion log-probs and lengths in the current role: (B,), (B,). Rows of one prompt (a pair's
    chosen and rejected) compute it once where that pays (:mod:`lowalign.prompt_sharing`)."""
    from lowalign.generation import encode_completions
    from lowalign.logprobs import logprobs_from_hidden
    from lowalign.prompt_sharing import completion_hidden_states

    b = encode_completions(bundle.tokenizer, prompts, completions, bundle.device)
    h = completion_hidden_states(bundle, b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    out = logprobs_from_hidden(bundle, h, b.input_ids, b.target_mask)
    m = b.target_mask.float()
    return (out.logps * m).sum(1), m.sum(1)


def sequence_logps(bundle, pairs: list[dict]):
    """Summed completion log-probs and lengths in the current role, chosen then rejected: (2B,), (2B,)."""
    return completion_logps(bundle, *pair_columns(pairs))


@torch.no_grad()
def reference_logps(ctx, pairs: list[dict], batch_size: int | None = None) -> torch.Tensor:
    """Reference log-probs of every pair, (n, 2) [chosen, rejected], cached as safetensors in the run
    directory (or ``train.reference_cache_dir``), keyed by the pairs' text and the *content* of the model,
    tokenizer and starting adapter (``lowalign.models.fingerprint``): a model re-saved at the same path with
    other weights gets its reference recomputed. Computed ``batch_size`` pairs at a time (default: the
    training batch, which fits by construction: a bigger no-grad batch could be what runs out of memory)."""
    batch_size = batch_size or getattr(ctx.cfg.train, "batch_size", 0) or 32
    from safetensors.torch import load_file, save_file

    from lowalign.models import fingerprint

    m, ref = ctx.cfg.model, reference_mode(ctx.cfg)
    adapters = {"init": [ctx.cfg.lora.init_from], "soup": ctx.cfg.reference_soup}.get(ref, [])
    key = hashlib.sha256(json.dumps([pairs, fingerprint(m.name_or_path, m.gguf_file), m.quantization, m.dtype, ref,
                                     [fingerprint(a) for a in adapters]],
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(getattr(ctx.cfg.train, "reference_cache_dir", None) or ctx.run_dir.path)
    cache = cache_dir / f"ref_logps-{key}.safetensors"
    if cache.exists():
        return load_file(str(cache))["ref_logps"]
    out = []
    with ctx.bundle.use("reference"), ctx.bundle.eval_mode(), PHASES.phase("reference"):
        for s in range(0, len(pairs), batch_size):
            lp, _ = sequence_logps(ctx.bundle, pairs[s:s + batch_size])
            n = len(pairs[s:s + batch_size])
            out.append(torch.stack([lp[:n], lp[n:]], 1).cpu())
    ref_lp = torch.cat(out)
    if ctx.run_dir.writer:  # the other ranks computed the same values
        atomic_write(cache, lambda p: save_file({"ref_logps": ref_lp.contiguous()}, str(p)))
    return ref_lp


def heldout_mean(bundle, rows: list[dict], fn: Callable, batch_size: int = 128) -> float:
    """Mean over held-out ``rows`` of ``fn(chunk, start) -> (B,) scores`` (``start``: the chunk's offset in
    ``rows``), computed under no grad in the policy role, chunk by chunk."""
    total = 0.0
    with torch.no_grad(), bundle.use(POLICY):
        for s in range(0, len(rows), batch_size):
            total += float(fn(rows[s:s + batch_size], s).sum())
    return total / max(1, len(rows))


def preference_hits(margin: torch.Tensor) -> torch.Tensor:
    """1 where the chosen completion wins, 0 where it loses, 1/2 on a tie (a fresh adapter scores 0.5)."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


# ---- the shared loop ---------------------------------------------------------------------------------------


@dataclass
class PreferenceObjective:
    """What a preference algorithm plugs into :func:`train_preference`.

    Attributes:
        loss: ``loss(rows, idx) -> LossOutput`` for one batch (pairs, or feedback rows), called in the policy
            role, training mode; ``idx`` are the rows' indices in the training set (for precomputed values).
            Under torchrun the rows are this rank's share of the step's batch, and the loss their mean.
        heldout: ``heldout(rows) -> dict`` of held-out metrics (e.g. preference accuracy).
        whole_batch: ``loss`` receives the step's whole batch and returns the mean over this rank's share
            itself (KTO: its reference point pairs each row with another row of the whole batch).
    """

    loss: Callable
    heldout: Callable
    whole_batch: bool = False


def train_preference(ctx, desc: str, objective: Callable[[PreferenceData], PreferenceObjective], *,
                     load: Callable = run_pairs, unit: str = "pairs",
                     bar_fields=("loss", "rewards/accuracy", "rewards/margin")) -> dict:
    """The loop every preference algorithm shares: the policy adapter, the run's data (``load``, after the
    policy exists: built-in on-policy pairs are sampled from it), seeded batches that are a pure function of
    the step, clipping, schedule, held-out evaluation, checkpoints and resume. ``objective(data)`` builds the
    algorithm's loss once the data exist (DPO precomputes reference log-probs there)."""
    cfg, tc, bundle = ctx.cfg, ctx.cfg.train, ctx.bundle
    add_policy(ctx)
    data = load(ctx, tc, role=POLICY)  # the fresh adapter is the starting policy
    t_obj = time.time()
    obj = objective(data)  # DPO-style objectives precompute the reference log-probs here
    setup_s = round(time.time() - t_obj, 3)
    if setup_s >= 1:
        ctx.console.print(f"objective setup (reference log-probs, when precomputed): {setup_s:.1f}s")
    params = bundle.adapter_parameters(POLICY)
    opt, sched = make_optimizer(params, tc.optim, tc.steps)

    def evaluate_fn(c):
        res = evaluate(c) if c.data.eval_rows_all else {}
        with bundle.eval_mode():
            res.update(obj.heldout(data.eval))
        return res

    start, baseline = start_or_resume(ctx, [POLICY], opt, sched, evaluate_fn=evaluate_fn)
    bundle.base.train()
    d = ctx.dist
    with Progress(tc.steps, start, bar_fields, desc=desc, every=tc.log_every) as bar:
        for step in range(start, tc.steps):
            t0 = time.time()
            seed_everything(step_seed(cfg.seed, step))
            idx = pair_batch(data.train, step, tc.batch_size, cfg.seed)
            idx = idx if obj.whole_batch else d.shard(idx)  # this rank's equal share of the batch
            with bundle.use(POLICY), PHASES.phase("forward_backward"):
                out = obj.loss([data.train[i] for i in idx], idx)
                (out.loss / d.world).backward()  # a mean over 1/world of the batch; ranks' gradients add up
            gn = optimizer_step(d, params, opt, sched, tc.optim.max_grad_norm)
            m = {"step": step + 1, **d.mean({"loss": out.loss.item(), **{k: float(v) for k, v in out.metrics.items()}}),
                 "grad_norm": float(gn), "lr": sched.get_last_lr()[0], "time/step_s": round(time.time() - t0, 3)}
            end_step(ctx, tc, step + 1, m, bar, [POLICY], baseline, opt, sched, evaluate_fn=evaluate_fn)
    return finish(ctx, [POLICY], baseline, {"steps": tc.steps, unit: len(data.train),
                                            "time/objective_setup_s": setup_s}, evaluate_fn)


# ---- held-out preference accuracy --------------------------------------------------------------------------


def average_logps(bundle, pairs: list[dict]) -> torch.Tensor:
    """Per-token averaged completion log-probs in the current role, chosen then rejected: (2B,)."""
    lp, lens = sequence_logps(bundle, pairs)
    return lp / lens.clamp(min=1)


def implicit_reward_accuracy(ctx) -> Callable:
    """``heldout(pairs)`` for algorithms with a reference (DPO, TDPO, ...): share of held-out pairs whose
    implicit reward beta (logp - ref) prefers the chosen completion (reference log-probs cached)."""

    def heldout(pairs):
        ref = reference_logps(ctx, pairs)  # computed once, then read from its cache file

        def hits(chunk, start):
            n = len(chunk)
            lp, _ = sequence_logps(ctx.bundle, chunk)
            r = ref[start:start + n].to(lp.device)
            return preference_hits((lp[:n] - r[:, 0]) - (lp[n:] - r[:, 1]))

        return {"preference_accuracy": heldout_mean(ctx.bundle, pairs, hits)}

    return heldout


def average_logp_accuracy(ctx) -> Callable:
    """``heldout(pairs)`` for reference-free algorithms (ORPO, SimPO): share of held-out pairs whose length-
    averaged log-prob (SimPO's implicit reward; ORPO's log-odds ratio has the same sign) prefers the chosen
    completion."""

    def heldout(pairs):
        def hits(chunk, _start):
            a = average_logps(ctx.bundle, chunk)
            return preference_hits(a[:len(chunk)] - a[len(chunk):])

        return {"preference_accuracy": heldout_mean(ctx.bundle, pairs, hits)}

    return heldout
