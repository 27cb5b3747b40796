"""Rewards for GSM8K-format data (``question`` / ``answer`` with the final number after '####')."""

from __future__ import annotations

import re

from lowalign.data import numeric_match

_FINAL = re.compile(r"####\s*-?\d[\d,]*(?:\.\d+)?\s*$")


def correctness_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion's final number equals the reference answer."""
    return [1.0 if numeric_match(c, a) else 0.0 for c, a in zip(completions, answer)]


def format_reward(prompts, completions, **_) -> list[float]:
    """1.0 when the completion ends by stating its answer as '#### <number>'."""
    return [1.0 if _FINAL.search(c.strip()) else 0.0 for c in completions]
