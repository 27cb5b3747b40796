"""Multi-objective GRPO on a user rating file: a multi-attribute reward head trained on named score columns,
then GRPO with per-attribute weights from the recipe, every attribute logged and evaluated."""

import json

import pytest

from .helpers import cli, metrics, summary

RM_SMALL = ["train.steps=6", "train.batch_size=8", "train.eval_pairs=8", "train.checkpoint_every=0", "threads=1"]


@pytest.fixture(scope="module")
def ratings_rm(tmp_path_factory):
    out = tmp_path_factory.mktemp("rmr") / "rm"
    cli("run", "recipes/rm_ratings_tiny.yaml", f"output_dir={out}", *RM_SMALL)
    return out


def test_reward_model_on_a_rating_file(ratings_rm):
    s = summary(ratings_rm)
    keys = {"pairwise_accuracy", "reward_corr", *(f"{m}/{a}" for m in ("mae", "corr")
                                                  for a in ("correctness", "format", "length"))}
    assert keys <= s["final"].keys() and s["ratings"] > 0
    meta = json.loads((ratings_rm / "adapters" / "reward_meta.json").read_text())
    assert meta["attributes"] == ["correctness", "format", "length"] and meta["weights"] == [1.0, 0.1, 0.1]
    assert s["memory"]["head:reward"] == (256 + 1) * 3 * 4  # three outputs on a 256-wide hidden state
    assert {"mae/correctness", "mae/format", "mae/length"} <= metrics(ratings_rm)[0].keys()


def test_grpo_logs_every_attribute_and_their_weighted_sum(ratings_rm, tmp_path):
    out = tmp_path / "mo"
    cli("run", "recipes/grpo_multiobjective_tiny.yaml", f"output_dir={out}", f"rewards.0.path={ratings_rm}",
        "train.steps=2", "train.prompts_per_step=4", "train.num_generations=4", "eval.num_examples=20",
        "rewards.0.attribute_weights={correctness: 1.0, length: 0.5}", "threads=1")
    src = "rewards/adapter:reward"
    for r in metrics(out):
        weighted = r[f"{src}/correctness"] + 0.5 * r[f"{src}/length"]  # format left out: weight 0
        assert abs(r[src] - weighted) < 1e-4 and abs(r["reward"] - r[src] - r["rewards/correctness_reward"]) < 1e-4
        assert f"{src}/format" in r
    final = summary(out)["final"]
    assert {"reward/adapter:reward/correctness", "reward/adapter:reward/format", "reward/adapter:reward/length",
            "reward/adapter:reward", "accuracy"} <= final.keys()


def test_bad_attribute_weights_fail_before_the_model_loads(ratings_rm, tmp_path):
    p = cli("validate", "recipes/grpo_multiobjective_tiny.yaml", f"rewards.0.path={ratings_rm}",
            "rewards.0.attribute_weights={helpfulness: 1.0}", check=False)
    assert p.returncode == 2 and "rewards[0].attribute_weights" in p.stderr and "correctness" in p.stderr
    p = cli("validate", "recipes/grpo_tiny.yaml", "rewards.0.attribute_weights={correctness: 1.0}", check=False)
    assert p.returncode == 2 and "rewards[0].attribute_weights" in p.stderr
    p = cli("validate", "recipes/rm_ratings_tiny.yaml", "train.attribute_weights=[1.0]", check=False)
    assert p.returncode == 2 and "train.attribute_weights" in p.stderr
    p = cli("run", "recipes/rm_ratings_tiny.yaml", "train.attributes=[correctness, helpfulness]",
            "train.attribute_weights=[1.0, 1.0]", f"output_dir={tmp_path / 'x'}", check=False)
    assert p.returncode == 2 and "'helpfulness'" in p.stderr and not (tmp_path / "x").exists()
