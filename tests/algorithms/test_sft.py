from .helpers import cli, metrics, summary


def test_sft_tiny_learns(tmp_path):
    out = tmp_path / "sft"
    cli("run", "recipes/sft_tiny.yaml", f"output_dir={out}", "train.steps=30", "eval.num_examples=100",
        "train.checkpoint_every=0", "threads=1")
    rows = metrics(out)
    assert len(rows) == 30
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first  # the answer NLL goes down
    s = summary(out)
    assert s["final"]["accuracy"] >= s["baseline"]["accuracy"] - 0.05
