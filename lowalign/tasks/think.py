"""Think-then-answer completions ("<think> ... </think> answer", RLMT: Bhaskar et al. 2025, arXiv 2509.20357):
the format reward, and the answer part that checkers and learned rewards read (``data.think: true``)."""

from __future__ import annotations

import re

_THINK_RE = re.compile(r"^\s*<think>(.+?)</think>\s*(\S.*)$", re.DOTALL)


def answer_part(completion: str) -> str:
    """The reply after the last ``</think>``; the whole completion when it opens no ``<think>``; empty while a
    ``<think>`` is left open (still thinking: no answer yet)."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1].strip()
    return "" if "<think>" in completion else completion


def think_format_reward(prompts, completions, **_) -> list[float]:
    """1.0 for "<think> reasoning </think> answer" (non-empty reasoning, then a non-empty answer), else 0.0."""
    return [1.0 if _THINK_RE.match(c) and _THINK_RE.match(c).group(1).strip() else 0.0 for c in completions]


class AnswerPartChecker:
    """``checker`` applied to the answer part only: what accuracy, the report and correctness rewards read
    when ``data.think`` is on."""

    def __init__(self, checker):
        self.checker = checker

    def __call__(self, completion: str, answer: str) -> bool:
        return self.checker(answer_part(completion), answer)
