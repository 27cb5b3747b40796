"""Preference pairs for a run: built (or loaded) once, stored in the run directory so resume reuses them."""

from __future__ import annotations

import json

from lowalign.data import epoch_indices
from lowalign.preference import PreferenceData, builtin_pairs, eval_pairs, load_file_pairs
from lowalign.runtime import atomic_write_text


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
                              samples=tc.onpolicy_samples, max_new_tokens=tc.max_new_tokens, role=role)
        data = PreferenceData(train, eval_pairs(ctx.data.task, tc.eval_pairs, cfg.seed + 7))
    else:
        data = load_file_pairs(cfg.data, ctx.bundle.tokenizer, cfg.seed, tc.eval_pairs)
    if not data.train:
        from lowalign.data import DataError

        raise DataError("no preference pairs to train on")
    atomic_write_text(f, json.dumps({"train": data.train, "eval": data.eval}))
    ctx.console.print(f"preference pairs: {len(data.train)} train, {len(data.eval)} held-out")
    return data


def pair_batch(pairs: list[dict], step: int, n: int, seed: int) -> list[int]:
    """Indices of the pairs for ``step``: epochs of a seeded permutation, a pure function of step."""
    return epoch_indices(len(pairs), step, n, seed)


def encode_pairs(bundle, pairs: list[dict]):
    """One teacher-forcing batch of 2B rows: every pair's chosen completion, then every rejected one."""
    from lowalign.generation import encode_completions

    prompts = [p["prompt"] for p in pairs] * 2
    comps = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return encode_completions(bundle.tokenizer, prompts, comps, bundle.device)
