from lowalign.tasks.arithmetic import (
    ArithmeticTask,
    correctness_reward,
    extract_answer,
    format_reward,
    is_correct,
    length_reward,
)


def test_rows_are_seeded_and_held_out_is_disjoint():
    t = ArithmeticTask(ops="+-")
    assert t.train_rows(20, seed=3) == t.train_rows(20, seed=3)
    assert t.train_rows(20, seed=3) != t.train_rows(20, seed=4)
    held = {r["prompt"] for r in t.eval_rows()}
    assert len(held) == int(2 * 100 * 100 * 0.1)
    assert not held & t.train_problem_set()
    assert not held & {r["prompt"] for r in t.train_rows(2000, seed=0)}


def test_answers_and_checker():
    t = ArithmeticTask(ops="+-*", max_operand=9)
    for r in t.train_rows(50, seed=1):
        a, op, b = r["prompt"][3:-4].partition("+")[0], None, None  # noqa: F841
        expr = r["prompt"].removeprefix("Q: ").removesuffix("= A:")
        assert int(r["answer"]) == eval(expr)  # the answer is the arithmetic result
    assert is_correct(" 85", "85") and not is_correct("85 ", "58") and not is_correct("850", "85")
    assert extract_answer("12abc") == "12" and extract_answer("x12") is None


def test_rewards():
    comps, ans = ["85", "8x", " 85", "85858585"], ["85"] * 4
    assert correctness_reward(None, comps, answer=ans) == [1.0, 0.0, 1.0, 0.0]
    assert format_reward(None, comps) == [1.0, 0.0, 1.0, 1.0]
    assert length_reward(None, comps, answer=ans) == [1.0, 1.0, 1.0, 0.0]
