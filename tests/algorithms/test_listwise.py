"""PRO and RRHF end to end on the tiny model: ranked lists built once (the right answer first, own samples
included, lists that rank nothing dropped) and kept for resume, no reference pass, a rating file as the
source, and bad list settings refused before anything loads."""

import json

import pytest

from .helpers import cli, metrics, roles_used, summary

SMALL = ["train.num_lists=24", "train.eval_lists=8", "eval.num_examples=16", "train.batch_size=4",
         "train.checkpoint_every=0", "threads=1"]


@pytest.mark.parametrize("algo", ["pro", "rrhf"])
def test_tiny_recipe_runs_on_ranked_lists(tmp_path, algo):
    out = tmp_path / algo
    cli("run", f"recipes/{algo}_tiny.yaml", f"output_dir={out}", "train.steps=4", *SMALL)
    s = summary(out)
    assert {"accuracy", "ranking_accuracy"} <= s["final"].keys() and s["lists"] <= 24
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in rows)
    lists = json.loads((out / "lists.json").read_text())
    for lst in lists["train"]:
        assert len(lst["completions"]) == 5 + 4 == len(lst["scores"])  # 5 built + 4 own samples
        assert lst["completions"][0].strip("?! ") == lst["answer"] and len(set(lst["scores"])) > 1
        if lst["completions"][0] == lst["answer"]:  # the right answer without a format slip scores highest
            assert lst["scores"][0] == max(lst["scores"])
    assert all(len(lst["completions"]) == 5 for lst in lists["eval"])  # held-out: no samples


def test_listwise_never_runs_the_reference(tmp_path, monkeypatch):
    roles = roles_used(monkeypatch, "recipes/pro_tiny.yaml", [f"output_dir={tmp_path / 'pro'}", "train.steps=2",
                                                              *SMALL])
    assert "policy" in roles and "reference" not in roles


def test_rrhf_on_a_rating_file(tmp_path):
    """The shipped rating file: rows grouped by prompt into lists, scored by the weighted attribute columns."""
    out = tmp_path / "rrhf"
    cli("run", "recipes/rrhf_tiny.yaml", f"output_dir={out}", "data.path=recipes/data/arith_ratings.jsonl",
        "data.completion_column=response", "train.attributes=[correctness,format,length]",
        "train.attribute_weights=[1.0,0.1,0.1]", "train.steps=3", "train.eval_lists=4", "train.batch_size=4",
        "eval.num_examples=8", "train.checkpoint_every=0", "threads=1")
    lists = json.loads((out / "lists.json").read_text())
    rows = [json.loads(x) for x in open("recipes/data/arith_ratings.jsonl")]
    first = lists["train"][0]
    mine = [r for r in rows if r["prompt"] == first["prompt"]]
    assert first["completions"] == [r["response"] for r in mine]
    assert first["scores"] == [round(r["correctness"] + 0.1 * r["format"] + 0.1 * r["length"], 6) for r in mine]
    assert len(metrics(out)) == 3


def test_a_rating_file_without_attributes_is_refused_before_loading(tmp_path):
    p = cli("run", "recipes/pro_tiny.yaml", f"output_dir={tmp_path / 'x'}",
            "data.path=recipes/data/arith_ratings.jsonl", "data.completion_column=response", check=False)
    assert p.returncode == 2 and "train.attributes" in p.stderr and not (tmp_path / "x").exists()
