"""Integer arithmetic: a synthetic, verifiable task family generated from a seed.

A problem is ``(a, op, b)`` rendered as ``"Q: 47+38= A:"``; the expected completion is the answer's
digits (``"85"``) followed by EOS. The problem space (every operand pair for every operator) is split
once, by a fixed seeded permutation, into a training part and a disjoint held-out part, so evaluation
never sees a training problem whatever seed the training sampler uses.

Reward functions follow the lowalign reward API: ``fn(prompts, completions, **columns) -> list[float]``
with the dataset's ``answer`` column passed as a keyword list.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_ANSWER_RE = re.compile(r"^\s*(-?\d+)")
_STRICT_RE = re.compile(r"^-?\d+$")


def render_prompt(a: int, op: str, b: int) -> str:
    return f"Q: {a}{op}{b}= A:"


QUESTION = "What is {a} {op} {b}? Reply with just the number."


def render_question(a: int, op: str, b: int, template: str = QUESTION) -> str:
    """The problem as a chat question (``data.chat_template: true``): an instruct model's user message."""
    return template.format(a=a, op=op, b=b)


def extract_answer(completion: str) -> str | None:
    """The leading integer of a completion, or None when it does not start with one."""
    m = _ANSWER_RE.match(completion)
    return m.group(1) if m else None


def is_correct(completion: str, answer: str) -> bool:
    """Exact check: the completion, stripped, is exactly the answer's digits."""
    return completion.strip() == str(answer)


@dataclass(frozen=True)
class ArithmeticTask:
    """Problems ``a op b`` with ``0 <= a, b <= max_operand``.

    Attributes:
        ops: operators to draw from (subset of ``+ - *``).
        max_operand: largest operand.
        eval_fraction: share of the problem space held out for evaluation.
        split_seed: seed of the fixed train/held-out split (keep it fixed to compare runs).
        question: render each problem as a chat question ("What is 13 + 54? Reply with just the number.");
            the split is the same either way.
    """

    ops: str = "+"
    max_operand: int = 99
    eval_fraction: float = 0.1
    split_seed: int = 1234
    question: bool = False  # render problems as chat questions (render_question), not "Q: a+b= A:"
    question_template: str = QUESTION  # the chat question's wording (data.task.question)

    def __post_init__(self):
        bad = [o for o in self.ops if o not in _OPS]
        if bad or not self.ops:
            raise ValueError(f"task.ops: {self.ops!r} has unknown operator(s) {bad}; use some of '+-*'")
        if self.max_operand < 1:
            raise ValueError("task.max_operand must be >= 1")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError("task.eval_fraction must be in (0, 1)")
        try:
            self.question_template.format(a=1, op="+", b=2)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"task.question: {self.question_template!r} is not a format string of {{a}}, {{op}}, "
                             f"{{b}} ({type(e).__name__}: {e})") from None

    def _space(self) -> list[tuple[int, str, int]]:
        r = range(self.max_operand + 1)
        return [(a, op, b) for op in self.ops for a in r for b in r]

    def _split(self) -> tuple[list, list]:
        space = self._space()
        random.Random(self.split_seed).shuffle(space)
        n_eval = max(1, int(len(space) * self.eval_fraction))
        return space[n_eval:], space[:n_eval]

    def _row(self, p: tuple[int, str, int]) -> dict:
        a, op, b = p
        return {"prompt": self._render(a, op, b), "answer": str(_OPS[op](a, b))}

    def _render(self, a: int, op: str, b: int) -> str:
        return render_question(a, op, b, self.question_template) if self.question else render_prompt(a, op, b)

    def train_rows(self, n: int, seed: int) -> list[dict]:
        """``n`` training rows sampled (with replacement) by ``seed``."""
        train, _ = self._split()
        rng = random.Random(seed)
        return [self._row(rng.choice(train)) for _ in range(n)]

    def eval_rows(self, n: int | None = None) -> list[dict]:
        """The first ``n`` held-out rows (always the same ones)."""
        _, held = self._split()
        return [self._row(p) for p in held[: n or len(held)]]

    def train_problem_set(self) -> set[str]:
        return {self._render(*p) for p in self._split()[0]}


# ---- reward functions: fn(prompts, completions, **columns) -> list[float] ----------------------


def correctness_reward(prompts, completions, answer, checker=None, **_) -> list[float]:
    """1.0 when the run's answer checker accepts the completion (``data.answer_format``: exact for "Q: a+b= A:"
    prompts, the final number for chat questions), else 0.0. Outside a run (no checker): exact."""
    check = checker or is_correct
    return [1.0 if check(c, a) else 0.0 for c, a in zip(completions, answer)]


def format_reward(prompts, completions, **_) -> list[float]:
    """1.0 when the completion is a bare integer (digits, optional minus sign), else 0.0."""
    return [1.0 if _STRICT_RE.match(c.strip()) else 0.0 for c in completions]


def length_reward(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 up to the answer's length (or 4 characters without answers), falling linearly to 0.0 at
    twice that length: discourages rambling past the answer."""
    out = []
    for i, c in enumerate(completions):
        target = max(1, len(answer[i])) if answer is not None else 4
        extra = max(0, len(c.strip()) - target)
        out.append(max(0.0, 1.0 - extra / target))
    return out
