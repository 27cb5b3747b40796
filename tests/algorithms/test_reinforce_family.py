"""ReMax and REINFORCE++ end to end on the tiny model: they run on GRPO's step with their own advantages."""

from .helpers import cli, metrics, summary

SMALL = ["train.steps=3", "train.prompts_per_step=8", "eval.num_examples=40", "train.checkpoint_every=0",
         "threads=1"]


def test_remax_uses_the_greedy_baseline(tmp_path):
    out = tmp_path / "remax"
    cli("run", "recipes/remax_tiny.yaml", f"output_dir={out}", *SMALL)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["reward_greedy"] <= 1.1 for r in rows)  # correctness + 0.1 x format
    assert "accuracy" in summary(out)["final"]


def test_reinforce_pp_folds_the_kl_into_the_reward(tmp_path):
    out = tmp_path / "rpp"
    cli("run", "recipes/reinforcepp_tiny.yaml", f"output_dir={out}", *SMALL)
    rows = metrics(out)
    assert rows[0]["reward_kl"] == 0.0  # step 1: the fresh adapter is the reference
    assert rows[-1]["reward_kl"] > 0 and "kl" not in rows[-1]  # the KL is in the reward, not in the loss
    out_b = tmp_path / "rpp_b"
    cli("run", "recipes/reinforcepp_tiny.yaml", f"output_dir={out_b}", "train.baseline=true", *SMALL)
    assert metrics(out_b)[0]["loss"] != rows[0]["loss"]  # the group baseline changes the advantages


def test_reinforce_pp_baseline_needs_groups():
    p = cli("validate", "recipes/reinforcepp_tiny.yaml", "train.baseline=true", "train.num_generations=1",
            check=False)
    assert p.returncode == 2 and "train.baseline" in p.stderr
