import json
import random

import pytest

from lowalign.config import DataConfig
from lowalign.data import DataError
from lowalign.preference import correctness_pairs, load_file_pairs, near_miss
from lowalign.tasks.arithmetic import ArithmeticTask
from lowalign.tiny import byte_tokenizer


def test_near_miss_is_plausible_and_wrong():
    rng = random.Random(0)
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            m = near_miss(str(a + b), a, b, rng)
            assert m.strip() != str(a + b) and len(m) <= len(str(a + b)) + 2


def test_correctness_pairs_are_seeded():
    t = ArithmeticTask()
    assert correctness_pairs(t, 20, 1) == correctness_pairs(t, 20, 1) != correctness_pairs(t, 20, 2)


def _write(tmp_path, rows):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_string_and_conversational_formats(tmp_path):
    s = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(30)]
    d = load_file_pairs(DataConfig(path=str(_write(tmp_path, s))), byte_tokenizer(), 0, 100)
    assert len(d.eval) == 3 and len(d.train) == 27 and d.train[0]["chosen"] == "good"
    conv = [{"chosen": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "go away"}]}
            for i in range(30)]
    d = load_file_pairs(DataConfig(path=str(_write(tmp_path, conv))), byte_tokenizer(), 0, 100)
    p = d.train[0]
    assert p["prompt"].startswith("user: hi") and p["prompt"].endswith("assistant: ")  # no chat template
    assert (p["chosen"], p["rejected"]) == ("hello", "go away")


def test_errors_name_columns_and_lengths(tmp_path):
    f = _write(tmp_path, [{"question": "q", "good": "a", "bad": "b"}] * 20)
    with pytest.raises(DataError, match=r"missing column\(s\) \['prompt', 'chosen', 'rejected'\]"):
        load_file_pairs(DataConfig(path=str(f)), byte_tokenizer(), 0, 10)
    f = _write(tmp_path, [{"prompt": "x" * (100 if i < 3 else 5), "chosen": "a", "rejected": "b"} for i in range(40)])
    msg = r"[23] of 36 train prompts exceed data.max_prompt_tokens=50 \(longest 100 tokens"
    with pytest.raises(DataError, match=msg):
        load_file_pairs(DataConfig(path=str(f), max_prompt_tokens=50), byte_tokenizer(), 0, 4)
    d = load_file_pairs(DataConfig(path=str(f), max_prompt_tokens=50, truncation="drop"), byte_tokenizer(), 0, 4)
    assert all(len(p["prompt"]) <= 50 for p in d.train)


def test_rating_files(tmp_path):
    from lowalign.preference import load_file_ratings, rating_rows

    rows = rating_rows(ArithmeticTask(), 40, 0)
    assert rows == rating_rows(ArithmeticTask(), 40, 0) and len(rows) == 40 * 5
    assert {r["correctness"] for r in rows} == {0.0, 1.0} and min(r["length"] for r in rows) < 1
    f = _write(tmp_path, rows)
    cfg = DataConfig(path=str(f), completion_column="response")
    d = load_file_ratings(cfg, byte_tokenizer(), 0, 100, ["correctness", "length"])
    assert d.train[0]["scores"] == [rows[0]["correctness"], rows[0]["length"]]
    assert len(d.eval) == 4 * 5  # 10% of the 40 prompts, with all their rows
    assert not {r["prompt"] for r in d.eval} & {r["prompt"] for r in d.train}
    with pytest.raises(DataError, match=r"missing score column\(s\) \['helpfulness'\]"):
        load_file_ratings(cfg, byte_tokenizer(), 0, 100, ["helpfulness"])
    bad = _write(tmp_path, [rows[0], {**rows[1], "length": "long"}])
    with pytest.raises(DataError, match=r"row 2: score column 'length' must be a finite number, got 'long'"):
        load_file_ratings(DataConfig(path=str(bad), completion_column="response"), byte_tokenizer(), 0, 10,
                          ["length"])


def test_builtin_pairs_follow_the_runs_chat_template_and_checker():
    """A chat run (data.chat_template) gets its pairs' prompts through the same template as its training and
    held-out prompts, and on-policy samples ranked by the run's checker, not exact match."""
    from lowalign.preference import builtin_pairs, eval_pairs, onpolicy_pairs

    t = ArithmeticTask(question=True)
    render = lambda q: f"<user>{q}</user><assistant>"  # noqa: E731
    pairs = builtin_pairs("correctness", t, 30, 0, render=render) + eval_pairs(t, 10, 0, render)
    plain = correctness_pairs(t, 30, 0) + eval_pairs(t, 10, 0)
    for p, q in zip(pairs, plain):
        assert p["prompt"] == render(q["prompt"])
        a, b = (int(x) for x in q["prompt"].removeprefix("What is ").split("?")[0].split(" + "))
        assert p["chosen"] == str(a + b) != p["rejected"].strip()

    class Roll:  # the model says "The answer is <a+b>." to every prompt
        def __init__(self, texts):
            self.texts = texts

    import lowalign.generation as g

    rows = t.train_rows(6, seed=0)
    orig = g.generate
    g.generate = lambda b, prompts, num_generations, **k: Roll(
        [f"The answer is {r['answer']}." for r in rows for _ in range(num_generations)])
    try:
        exact = onpolicy_pairs(_NullBundle(), rows, 2, 8, 0, "reference")
        final = onpolicy_pairs(_NullBundle(), rows, 2, 8, 0, "reference",
                               checker=lambda c, a: c.rstrip(".").split()[-1] == a)
    finally:
        g.generate = orig
    assert len(exact) == 6 and all(p["chosen"] == p["answer"] for p in exact)  # exact match: all wrong
    assert final == []  # the run's checker: all right, so no pair


class _NullBundle:
    from contextlib import nullcontext

    def use(self, role):
        return self.nullcontext()
