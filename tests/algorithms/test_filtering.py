"""RAFT, SuperHF and `lowalign bon` end to end on the tiny model: GRPO's sampling and scoring, then
reward-filtered fine-tuning (or, for bon, the best sample per prompt written to JSONL)."""

import json

from .helpers import cli, metrics, summary

SMALL = ["train.steps=3", "train.prompts_per_step=8", "eval.num_examples=40", "train.checkpoint_every=0",
         "threads=1"]


def test_raft_fine_tunes_on_the_kept_samples(tmp_path):
    out = tmp_path / "raft"
    cli("run", "recipes/raft_tiny.yaml", f"output_dir={out}", *SMALL)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 <= r["kept"] <= 8  # at most one per prompt
        if r["kept"]:
            assert r["reward_kept"] >= 1.0 and r["nll"] > 0 and r["loss"] == r["nll"] and r["kl"] == 0
    assert "accuracy" in summary(out)["final"]
    out2 = tmp_path / "raft_all"  # no threshold: exactly the best of every prompt's group is kept
    cli("run", "recipes/raft_tiny.yaml", f"output_dir={out2}", "train.min_reward=null", "train.keep_per_prompt=2",
        *SMALL)
    assert [r["kept"] for r in metrics(out2)] == [16, 16, 16]


def test_superhf_adds_the_kl_prior(tmp_path):
    out = tmp_path / "superhf"
    cli("run", "recipes/superhf_tiny.yaml", f"output_dir={out}", "train.kl_coef=0.5", *SMALL)
    rows = [r for r in metrics(out) if r["kept"]]
    assert rows and rows[0]["step"] == 1 and abs(rows[0]["kl"]) < 1e-6  # step 1: the fresh adapter is the reference
    assert any(r["kl"] > 0 for r in rows[1:])
    for r in rows:
        assert abs(r["loss"] - (r["nll"] + 0.5 * r["kl"])) < 1e-5


def test_bon_writes_the_best_sample_per_prompt(tmp_path):
    f = tmp_path / "best.jsonl"
    args = ["bon", "recipes/raft_tiny.yaml", "--out", f, "--n", "4", "--limit", "12", "--batch-size", "5",
            "--split", "eval", "threads=1"]
    cli(*args)
    rows = [json.loads(ln) for ln in f.read_text().splitlines()]
    assert len(rows) == 12 and all(r["n"] == 4 for r in rows)
    for r in rows:
        assert r["reward"] >= r["mean_reward"] - 1e-6
        assert abs(r["reward"] - (r["rewards"]["correctness_reward"] + 0.1 * r["rewards"]["format_reward"])) < 1e-5
        assert r["correct"] == (r["rewards"]["correctness_reward"] == 1.0)
    first = f.read_text()
    cli(*args)
    assert f.read_text() == first  # seeded per batch: the same file again
    p = cli("bon", "recipes/dpo_tiny.yaml", "--out", f, check=False)
    assert p.returncode == 2 and "rewards:" in p.stderr
    p = cli("bon", "recipes/raft_tiny.yaml", "--out", tmp_path / "no" / "x.jsonl", check=False)
    assert p.returncode == 2 and "--out" in p.stderr
