"""Answer checkers: one per ``data.answer_format``, shared by held-out ``accuracy``, the report's check marks,
``lowalign bon``'s ``correct`` and the correctness rewards (which receive the run's checker), so the number a
person reads and the reward that trained the model never disagree.

* ``exact``: the completion, stripped, is the answer (the tiny model's "85" after "Q: 47+38= A:");
* ``number``: the completion's last number equals the answer numerically ("13 + 54 = 67." for 67; commas in
  numbers are ignored), what a chat model's reply needs;
* ``gsm8k``: the number after the completion's last '####', else its last number (the reference answer is read
  after '####' too).

``auto`` (the default) is ``number`` with ``data.chat_template: true`` and ``exact`` otherwise.
"""

from __future__ import annotations

import re

_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in ``text``, commas dropped ("1,000" -> "1000"), or None."""
    nums = _NUM_RE.findall(text)
    return nums[-1].replace(",", "") if nums else None


def _same_number(got: str | None, answer: str) -> bool:
    if got is None:
        return False
    try:
        return abs(float(got) - float(str(answer).replace(",", ""))) < 1e-6
    except ValueError:
        return False


def exact_match(completion: str, answer: str) -> bool:
    """The stripped completion is exactly the answer."""
    return completion.strip() == str(answer).strip()


def final_number_match(completion: str, answer: str) -> bool:
    """The completion's last number equals the answer numerically."""
    return _same_number(last_number(completion), answer)


def gsm8k_match(completion: str, answer: str) -> bool:
    """The number after the completion's last '####' (else its last number) equals the answer numerically."""
    return _same_number(last_number(completion.split("####")[-1]), answer)


CHECKERS = {"exact": exact_match, "number": final_number_match, "gsm8k": gsm8k_match}


def resolve_format(answer_format: str, chat_template: bool) -> str:
    """``auto`` -> ``number`` for chat-templated prompts, else ``exact``; any other name as it is."""
    if answer_format == "auto":
        return "number" if chat_template else "exact"
    return answer_format


def correctness_reward(prompts, completions, answer, checker=None, **_) -> list[float]:
    """1.0 when the run's answer checker (``data.answer_format``) accepts the completion, else 0.0; held-out,
    its mean is exactly the reported ``accuracy``. Outside a run (no checker given): the final-number check."""
    check = checker or final_number_match
    return [1.0 if check(c, a) else 0.0 for c, a in zip(completions, answer)]
