import json

import pytest

from lowalign.config import DataConfig
from lowalign.data import DataError, gsm8k_answer, load_prompt_data, prepare_prompts
from lowalign.tasks.answers import gsm8k_match as numeric_match
from lowalign.tiny import byte_tokenizer


def _write(tmp_path, rows, name="d.jsonl"):
    f = tmp_path / name
    if name.endswith(".parquet"):
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(f))
    else:
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


ROWS = [{"question": f"What is {i} plus one?", "answer": f"{i}+1={i + 1}\n#### {i + 1:,}"} for i in range(995, 1045)]


@pytest.mark.parametrize("name", ["d.jsonl", "d.parquet"])
def test_local_gsm8k_format(tmp_path, name):
    f = _write(tmp_path, ROWS, name)
    d = load_prompt_data(DataConfig(path=str(f), prompt_column="question", answer_format="gsm8k"), 0, 100)
    assert len(d.eval_rows_all) == 5 and len(d.train_rows) == 45  # at most 10% held out, kept out of training
    assert not {r["prompt"] for r in d.eval_rows_all} & {r["prompt"] for r in d.train_rows}
    assert d.batch(3, 8, seed=1) == d.batch(3, 8, seed=1) and d.batch(3, 8, seed=1) != d.batch(4, 8, seed=1)
    r = d.batch(0, 1, 0)[0]
    assert r["answer"] == str(int(r["question"].split()[2]) + 1)  # '1,000' -> '1000'
    assert d.checker("so the answer is #### 1,000", "1000") and not d.checker("999", "1000")


def test_missing_columns_and_empty(tmp_path):
    f = _write(tmp_path, ROWS)
    with pytest.raises(DataError, match=r"missing column 'prompt'; available: \['answer', 'question'\]"):
        load_prompt_data(DataConfig(path=str(f)), 0, 10)
    e = tmp_path / "empty.jsonl"
    e.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        load_prompt_data(DataConfig(path=str(e)), 0, 10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: invalid JSON at column 2"):
        load_prompt_data(DataConfig(path=str(bad)), 0, 10)


@pytest.mark.parametrize("policy", ["error", "drop", "left"])
def test_overlong_prompts(tmp_path, policy):
    rows = [{"prompt": "x" * (300 if i % 5 == 0 else 10), "answer": "1"} for i in range(60)]
    cfg = DataConfig(path=str(_write(tmp_path, rows)), max_prompt_tokens=64, truncation=policy)
    d = load_prompt_data(cfg, 0, 10)
    if policy == "error":
        with pytest.raises(DataError, match=r"\d+ of \d+ train prompts exceed data.max_prompt_tokens=64"):
            prepare_prompts(d, byte_tokenizer(), cfg)
        return
    notes = prepare_prompts(d, byte_tokenizer(), cfg)
    assert notes and all(len(r["prompt"]) <= 64 for r in d.train_rows)
    assert len(d.train_rows) < 54 if policy == "drop" else len(d.train_rows) == 54


def test_answer_helpers():
    assert gsm8k_answer("blah\n#### 1,234") == "1234" and gsm8k_answer("#### -7") == "-7"
    with pytest.raises(DataError):
        gsm8k_answer("no final answer")
    assert numeric_match("x = 72.0", "72") and not numeric_match("none", "3")


def test_prompt_only_file_is_accepted_without_a_checker(tmp_path):
    f = _write(tmp_path, [{"prompt": f"write about {i}"} for i in range(30)])
    d = load_prompt_data(DataConfig(path=str(f)), 0, 10)
    assert d.checker is None and len(d.eval_rows_all) == 3 and "answer" not in d.train_rows[0]


def test_json_files_need_no_datasets_and_zero_eval_holds_out_nothing(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` would now raise ImportError
    f = _write(tmp_path, ROWS[:5])  # too few rows to hold out 10%
    cfg = DataConfig(path=str(f), prompt_column="question", answer_format="gsm8k")
    d = load_prompt_data(cfg, 0, 0)  # eval.num_examples=0 asks for no held-out set
    assert len(d.train_rows) == 5 and d.eval_rows_all == []
    with pytest.raises(DataError, match="too few rows"):
        load_prompt_data(cfg, 0, 10)
