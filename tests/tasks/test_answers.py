"""One answer checker per data.answer_format, shared by accuracy, the report, bon and the correctness rewards."""

import pytest

from lowalign.config import DataConfig, RewardSpec
from lowalign.data import load_prompt_data, prepare_prompts
from lowalign.rewards import RewardSources, row_columns
from lowalign.tasks.answers import CHECKERS, exact_match, final_number_match, gsm8k_match, resolve_format


@pytest.mark.parametrize("completion, answer, exact, number, gsm8k", [
    ("67", "67", True, True, True),
    (" 67\n", "67", True, True, True),
    ("13 + 54 = 67", "67", False, True, True),
    ("13 + 54 = 67.", "67", False, True, True),
    ("The answer is 1,000", "1000", False, True, True),
    ("so 12 #### 42", "42", False, True, True),
    ("#### 42 and then 7", "42", False, False, False),
    ("13 + 54 = 69", "67", False, False, False),
    ("-5", "-5", True, True, True),
    ("no number", "3", False, False, False),
    ("67", "sixty-seven", False, False, False),
])
def test_checkers_worked_examples(completion, answer, exact, number, gsm8k):
    assert exact_match(completion, answer) is exact
    assert final_number_match(completion, answer) is number
    assert gsm8k_match(completion, answer) is gsm8k


def test_auto_is_number_for_chat_prompts_and_exact_otherwise():
    assert resolve_format("auto", True) == "number" and resolve_format("auto", False) == "exact"
    assert resolve_format("gsm8k", True) == "gsm8k"
    plain = load_prompt_data(DataConfig(), 0, 10)
    chat = load_prompt_data(DataConfig(chat_template=True), 0, 10)
    assert plain.checker is CHECKERS["exact"] and chat.checker is CHECKERS["number"]
    assert plain.eval_rows_all[0]["prompt"].startswith("Q: ")
    q = chat.eval_rows_all[0]["prompt"]
    assert q.startswith("What is ") and q.endswith("? Reply with just the number.")
    # the same problems either way: the split does not depend on how a problem is rendered
    assert [r["answer"] for r in plain.eval_rows_all] == [r["answer"] for r in chat.eval_rows_all]


class _ChatTok:
    chat_template = "fake"

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return f"<system>be brief</system><user>{msgs[0]['content']}</user><assistant>"

    def __call__(self, text, add_special_tokens=False):
        return type("E", (), {"input_ids": text.split()})()


def test_chat_template_renders_task_batches_keeps_the_question_and_hides_it_from_rewards():
    data = load_prompt_data(DataConfig(chat_template=True), 0, 10)
    prepare_prompts(data, _ChatTok(), DataConfig(chat_template=True))
    for rows in (data.batch(3, 4, 0), data.eval_rows(4)):
        assert all(r["prompt"].startswith("<system>") and r["prompt"].endswith("<assistant>") for r in rows)
        assert all(r["_question"].startswith("What is ") and r["_question"] in r["prompt"] for r in rows)
        assert set(row_columns(rows)) == {"answer"}  # '_question' is not a column reward functions receive


def _user_reward(prompts, completions, answer):  # no checker parameter: never given one
    return [float(len(c)) for c in completions]


def test_correctness_rewards_use_the_runs_checker():
    specs = [RewardSpec(fn="lowalign.tasks.arithmetic:correctness_reward", name="arithmetic"),
             RewardSpec(fn="lowalign.tasks.gsm8k:correctness_reward", name="gsm8k"),
             RewardSpec(fn="lowalign.tasks.answers:correctness_reward", name="answers"),
             RewardSpec(fn="tests.tasks.test_answers:_user_reward")]
    completions, cols = ["13 + 54 = 67", "67", "69"], {"answer": ["67", "67", "67"]}
    number = RewardSources(specs, checker=CHECKERS["number"])(["p"] * 3, completions, cols)
    exact = RewardSources(specs, checker=CHECKERS["exact"])(["p"] * 3, completions, cols)
    for name in ("arithmetic", "gsm8k", "answers"):
        assert number.parts[name].tolist() == [1.0, 1.0, 0.0]
        assert exact.parts[name].tolist() == [0.0, 1.0, 0.0]
    assert number.parts["_user_reward"].tolist() == [12.0, 2.0, 2.0]
