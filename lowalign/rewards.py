"""Reward sources: plain callables ``fn(prompts, completions, **columns) -> list[float]`` named by import
path, or a learned reward adapter in the bundle; combined by weighted sum, each logged separately."""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
from dataclasses import dataclass

import torch


class RewardError(RuntimeError):
    """A reward function raised, returned the wrong length, or returned a non-finite value."""


def import_reward(path: str, where: str = "reward"):
    """Resolve ``'package.module:function'`` to a callable, with an error naming ``where``."""
    from lowalign.config import ConfigError

    if ":" not in path:
        raise ConfigError(f"{where}: '{path}' must look like 'package.module:function'")
    mod_name, fn_name = path.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import module '{mod_name}': {e}") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"{where}: '{mod_name}' has no callable '{fn_name}'")
    return fn


_CONFIDENCE_RE = re.compile(r"confidence(?:\s+level)?\s*(?:is|[:=])?\s*(\d+(?:\.\d+)?)\s*(%|/\s*10(?:0)?\b)?",
                            re.IGNORECASE)


def verbalized_confidence(text: str) -> float | None:
    """The confidence a completion states, in [0, 1], from its last "Confidence: 0.8"-style phrase ("confidence:
    80%", "Confidence 8/10", "confidence level is 0.75"; a bare number above 1 is out of 10 up to 10, out of 100
    above); None when it states none or a number past 100. The
    default parser of PPO-C (``train.confidence_parser``); any ``fn(text) -> float | None`` plugs in."""
    found = _CONFIDENCE_RE.findall(text)
    if not found:
        return None
    num, unit = found[-1]
    v = float(num)
    unit = unit.replace(" ", "")
    if unit in ("%", "/100") or (not unit and v > 10):
        v /= 100
    elif unit == "/10" or (not unit and v > 1):  # a bare 7 is 7 out of 10
        v /= 10
    return v if 0 <= v <= 1 else None


def row_columns(rows: list[dict], repeat: int = 1) -> dict[str, list]:
    """The data's columns (all but ``prompt``) as the keyword lists reward functions receive, each row's value
    repeated ``repeat`` times (one per completion of that prompt)."""
    return {k: [r[k] for r in rows for _ in range(repeat)] for k in rows[0] if k != "prompt" and not k.startswith("_")}


@dataclass
class RewardBatch:
    total: torch.Tensor  # (B,) weighted sum
    parts: dict[str, torch.Tensor]  # name -> (B,) unweighted


class RewardSources:
    """The weighted sum of several reward sources.

    Args:
        specs: list of :class:`lowalign.config.RewardSpec`.
        scorer: callable ``(adapter_name, prompts, completions) -> (Tensor (B,), {attribute: Tensor (B,)})``
            for learned rewards (the seam a reward adapter plugs into; see ``ModelBundle.score_attributes``):
            the reward and, for a multi-attribute head, each attribute, logged as ``<source>/<attribute>``.
    """

    def __init__(self, specs, scorer=None, checker=None, view=None):
        if not specs:
            from lowalign.config import ConfigError

            raise ConfigError("rewards: at least one reward source is needed")
        self.sources = []
        for i, s in enumerate(specs):
            if getattr(s, "dpo_adapter", None) is not None:  # a token-level reward (RTO): PPO adds it per token
                continue
            if s.fn is not None:
                fn = import_reward(s.fn, f"rewards[{i}].fn")
                if checker is not None and _takes_checker(fn):  # the run's answer checker (data.answer_format)
                    fn = functools.partial(fn, checker=checker)
                name = s.name or s.fn.split(":")[-1]
                self.sources.append((name, s.weight, fn, None))
            else:
                name = s.name or f"adapter:{s.adapter}"
                self.sources.append((name, s.weight, None, s.adapter))
        self.scorer = scorer
        self.view = view  # completion -> the part learned rewards score (data.think: the answer after </think>)

    @property
    def names(self) -> list[str]:
        return [n for n, *_ in self.sources]

    def probe(self, rows: list[dict]) -> None:
        """Call every reward *function* once on a few data rows, with the reference answers as completions,
        so a broken function fails before any model is loaded."""
        prompts = [r["prompt"] for r in rows]
        completions = [str(r.get("answer", "")) for r in rows]
        columns = row_columns(rows)
        for name, _, fn, _ in self.sources:
            if fn is not None:
                _call_checked(name, fn, prompts, completions, columns)

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardBatch:
        parts, total = {}, torch.zeros(len(completions), dtype=torch.float32)
        for name, weight, fn, adapter in self.sources:
            if fn is not None:
                vals = _call_checked(name, fn, prompts, completions, columns)
            else:
                if self.scorer is None:
                    raise RewardError(f"reward '{name}': no scorer for learned reward adapters")
                seen = [self.view(c) for c in completions] if self.view is not None else completions
                vals, attrs = self.scorer(adapter, prompts, seen)
                vals = vals.float().cpu()
                parts.update({f"{name}/{a}": v.float().cpu() for a, v in attrs.items()})
            parts[name] = vals
            total += weight * vals
        return RewardBatch(total=total, parts=parts)


def _takes_checker(fn) -> bool:
    """Whether a reward function names a ``checker`` parameter (the built-in correctness rewards do)."""
    try:
        return "checker" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _call_checked(name, fn, prompts, completions, columns) -> torch.Tensor:
    n = len(completions)
    try:
        out = fn(prompts, completions, **columns)
    except Exception as e:
        hint = ""
        if isinstance(e, (KeyError, TypeError)) and not any(f"'{c}'" in str(e) for c in columns):
            hint = f"\n  the data's columns (passed as keyword lists) are: {sorted(columns)}"
        raise RewardError(
            f"reward function '{name}' raised {type(e).__name__}: {e}\n"
            f"  first sample: prompt={prompts[0]!r} completion={completions[0]!r}{hint}") from e
    try:
        out = [float(x) for x in out]
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward function '{name}' must return a list of numbers, got {type(out).__name__}"
                          f" ({e})") from e
    if len(out) != n:
        raise RewardError(f"reward function '{name}' returned {len(out)} values for {n} completions\n"
                          f"  first sample: prompt={prompts[0]!r} completion={completions[0]!r}")
    for i, v in enumerate(out):
        if not math.isfinite(v):
            raise RewardError(f"reward function '{name}' returned a non-finite value {v} for sample {i}: "
                              f"prompt={prompts[i]!r} completion={completions[i]!r}")
    return torch.tensor(out, dtype=torch.float32)
