"""Think-then-answer completions (RLMT): the format reward, the answer part, and what checkers and learned rewards
read with data.think."""

import pytest
import torch

from lowalign.tasks.think import AnswerPartChecker, answer_part, think_format_reward


@pytest.mark.parametrize("text,answer", [
    ("<think>13 + 54: 3 + 4 = 7, 1 + 5 = 6</think> 67", "67"),
    ("<think>a</think>b</think> 12", "12"),  # the last close ends the thinking
    ("67", "67"),  # no thinking at all: the reply is the answer
    ("<think>still going, 67", ""),  # an open <think>: no answer yet
])
def test_answer_part(text, answer):
    assert answer_part(text) == answer


def test_think_format_reward():
    got = think_format_reward(None, ["<think>x</think> 67", "<think> </think> 67", "<think>x</think>", "67",
                                     "  <think>\nmulti\nline</think>\n67"])
    assert got == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_the_run_checker_and_learned_rewards_read_the_answer_part():
    from lowalign.config import DataConfig, RewardSpec
    from lowalign.data import load_prompt_data
    from lowalign.rewards import RewardSources

    data = load_prompt_data(DataConfig(think=True), 0, 4)
    assert isinstance(data.checker, AnswerPartChecker)
    assert data.checker("<think>67? no, 68</think> 67", "67") and not data.checker("<think>67</think> 68", "67")
    plain = load_prompt_data(DataConfig(), 0, 4)
    assert plain.view is None and not plain.checker("<think>x</think> 67", "67")
    seen = []

    def scorer(adapter, prompts, completions):
        seen.extend(completions)
        return torch.zeros(len(completions)), {}

    specs = [RewardSpec(fn="lowalign.tasks.think:think_format_reward"), RewardSpec(adapter="rm", path=".")]
    rb = RewardSources(specs, scorer=scorer, checker=data.checker, view=data.view)(
        ["p", "p"], ["<think>x</think> 67", "67"], {"answer": ["67", "67"]})
    assert seen == ["67", "67"]  # the learned reward saw only the answers
    assert rb.parts["think_format_reward"].tolist() == [1.0, 0.0]  # the format reward saw everything


@pytest.mark.parametrize("override,message", [("data.task.question=What is {x}?", "data.task.question: 'What is"),
                                              ("data.task.ops=+/", "data.task.ops: '+/' has unknown operator")])
def test_a_bad_task_setting_is_refused_naming_it(override, message):
    from tests.algorithms.helpers import cli

    p = cli("validate", "recipes/grpo_tiny.yaml", override, check=False)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
