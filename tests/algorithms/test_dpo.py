"""DPO end to end on the tiny model: pairs, cached reference log-probs, precompute == per-step reference."""

import json

from .helpers import cli, metrics, summary

SMALL = ["data.num_pairs=64", "train.eval_pairs=32", "eval.num_examples=40", "train.batch_size=8",
         "train.checkpoint_every=0", "threads=1"]


def test_dpo_tiny_run(tmp_path):
    out = tmp_path / "runs" / "dpo"
    cli("run", "recipes/dpo_tiny.yaml", f"output_dir={out}", "train.steps=6", *SMALL)
    s = summary(out)
    assert s["baseline"]["preference_accuracy"] == 0.5 and 0 <= s["final"]["preference_accuracy"] <= 1
    assert {"accuracy", "preference_accuracy"} <= s["final"].keys()
    pairs = json.loads((out / "pairs.json").read_text())
    assert len(pairs["train"]) >= 32 and {"onpolicy", "near_miss"} >= {p["source"] for p in pairs["train"]}
    assert all(p["chosen"] != p["rejected"] for p in pairs["train"])
    assert list((tmp_path / "runs" / ".lowalign-cache").glob("ref_logps-*.pt"))  # cached next to the run
    rows = metrics(out)
    assert len(rows) == 6 and all(0 <= r["rewards/accuracy"] <= 1 for r in rows)
    assert s["memory"]["adapter:policy"] > 0 and "adapter:reward" not in s["memory"]


def test_precomputed_reference_equals_per_step_reference(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cli("run", "recipes/dpo_tiny.yaml", f"output_dir={a}", "train.steps=2", "train.precompute_ref=true", *SMALL)
    cli("run", "recipes/dpo_tiny.yaml", f"output_dir={b}", "train.steps=2", "train.precompute_ref=false", *SMALL)
    ra, rb = metrics(a), metrics(b)
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["rewards/margin"] - y["rewards/margin"]) < 1e-5
