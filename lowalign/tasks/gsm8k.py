"""Rewards for GSM8K-format data (``question`` / ``answer`` with the final number after '####')."""

from __future__ import annotations

import re

from lowalign.tasks.answers import gsm8k_match

_FINAL = re.compile(r"####\s*-?\d[\d,]*(?:\.\d+)?\s*$")


def correctness_reward(prompts, completions, answer, checker=None, **_) -> list[float]:
    """1.0 when the completion's final number (after '####' when it has one) equals the reference answer; in a
    run, the run's answer checker (``data.answer_format``) decides, as it does for the reported accuracy."""
    check = checker or gsm8k_match
    return [1.0 if check(c, a) else 0.0 for c, a in zip(completions, answer)]


def format_reward(prompts, completions, **_) -> list[float]:
    """1.0 when the completion ends by stating its answer as '#### <number>'."""
    return [1.0 if _FINAL.search(c.strip()) else 0.0 for c in completions]
