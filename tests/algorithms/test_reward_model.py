"""Reward models (Bradley-Terry and multi-attribute regression) and GRPO rewarded by the learned adapter."""

import json

import pytest
import torch

from lowalign.tiny import TINY_DIR

from .helpers import cli, metrics, summary

SMALL = ["data.num_pairs=64", "train.eval_pairs=32", "train.batch_size=8", "train.checkpoint_every=0",
         "threads=1"]


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "rm"
    cli("run", "recipes/rm_tiny.yaml", f"output_dir={out}", "train.steps=6", *SMALL)
    return out


def test_bradley_terry_run(rm_run):
    s = summary(rm_run)
    assert 0 <= s["baseline"]["pairwise_accuracy"] <= 1 and 0 <= s["final"]["pairwise_accuracy"] <= 1
    ad = rm_run / "adapters"
    assert (ad / "reward" / "adapter_model.safetensors").exists() and (ad / "heads.safetensors").exists()
    assert json.loads((ad / "reward_meta.json").read_text())["objective"] == "bradley_terry"
    assert s["memory"]["head:reward"] == (256 + 1) * 4  # one scalar output on a 256-wide hidden state


def test_regression_run(tmp_path):
    out = tmp_path / "rmreg"
    cli("run", "recipes/rm_tiny.yaml", f"output_dir={out}", "train.steps=4", "train.objective=regression", *SMALL)
    s = summary(out)
    assert {"mae/correctness", "mae/format", "mae/length", "pairwise_accuracy"} <= s["final"].keys()
    assert json.loads((out / "adapters" / "reward_meta.json").read_text())["weights"] == [1.0, 0.1, 0.1]


def test_grpo_with_learned_reward_keeps_one_base(rm_run, tmp_path):
    out = tmp_path / "grpo_rm"
    cli("run", "recipes/grpo_rm_tiny.yaml", f"output_dir={out}", f"rewards.0.path={rm_run}", "train.steps=2",
        "train.prompts_per_step=4", "train.num_generations=4", "eval.num_examples=20", "threads=1")
    rows = metrics(out)
    assert "rewards/adapter:reward" in rows[0] and rows[0]["reward"] == rows[0]["rewards/adapter:reward"]
    mem = summary(out)["memory"]
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(TINY_DIR)
    uniq = {t.data_ptr(): t for t in [*plain.parameters(), *plain.buffers()]}.values()
    assert mem["base"] == sum(t.numel() * t.element_size() for t in uniq)  # exactly one copy of the base
    assert mem["adapter:policy"] > 0 and mem["adapter:reward"] > 0 and mem["head:reward"] > 0


def test_learned_reward_scores_match_training_head(rm_run):
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig

    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig(r=4))
    b.load_reward("reward", rm_run)
    assert b.role == "policy" and all(p.requires_grad for p in b.adapter_parameters("policy"))
    s1 = b.score_texts("reward", ["Q: 1+2= A:", "Q: 1+2= A:"], ["3", "4"])
    s2 = b.score_texts("reward", ["Q: 1+2= A:"], ["3"])
    assert s1.shape == (2,) and torch.isfinite(s1).all()
    torch.testing.assert_close(s1[:1], s2, rtol=1e-5, atol=1e-5)  # padding does not change a score


def test_rm_on_hh_format_file_with_qwen2(tmp_path, tiny_qwen2_dir):
    rows = [{"chosen": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "Helpful."}],
             "rejected": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "Rude!"}]}
            for i in range(40)]
    f = tmp_path / "hh.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm_hh"
    cli("run", "recipes/rm_hh.yaml", f"output_dir={out}", f"model.name_or_path={tiny_qwen2_dir}", f"data.path={f}",
        "model.device=cpu", "model.dtype=float32", "train.steps=3", "train.batch_size=4", "train.eval_pairs=8",
        "train.checkpoint_every=0", "threads=1")
    s = summary(out)
    assert s["pairs"] == 36 and 0 <= s["final"]["pairwise_accuracy"] <= 1
    assert (out / "adapters" / "reward" / "adapter_model.safetensors").exists()


def test_ppo_m_confidence_pairs(tmp_path):
    """PPO-M: every pair also gives the chosen answer with a high vs a low stated confidence and the rejected
    one with low vs high; trained and evaluated on those too."""
    from lowalign.preference import confidence_pairs

    pairs = [{"prompt": "Q: 1+1= A:", "chosen": "2", "rejected": "3", "answer": "2"}]
    out = confidence_pairs(pairs, seed=0)
    assert out[0] == pairs[0] and len(out) == 3
    hi, lo = out[1]["chosen"], out[1]["rejected"]
    assert hi.startswith("2 Confidence: ") and lo.startswith("2 Confidence: ")
    assert 0.8 <= float(hi.split(": ")[1]) <= 1.0 and 0.0 <= float(lo.split(": ")[1]) <= 0.3
    assert out[2]["chosen"].startswith("3 Confidence: 0.") and float(out[2]["chosen"].split(": ")[1]) <= 0.3
    assert float(out[2]["rejected"].split(": ")[1]) >= 0.8 and out[1]["source"] == "confidence"
    assert confidence_pairs(pairs, seed=0) == out  # seeded

    run = tmp_path / "ppo_m"
    cli("run", "recipes/rm_tiny.yaml", f"output_dir={run}", "train.steps=4", "train.confidence_pairs=true", *SMALL)
    s = summary(run)
    assert s["pairs"] == 3 * len(json.loads((run / "pairs.json").read_text())["train"])
    assert {"pairwise_accuracy", "confidence_pairwise_accuracy"} <= s["final"].keys()
    p = cli("validate", "recipes/rm_tiny.yaml", "train.confidence_pairs=true", "train.objective=regression",
            check=False)
    assert p.returncode == 2 and "train.confidence_pairs: PPO-M's confidence pairs" in p.stderr


def test_rlmt_recipe_runs_on_the_learned_reward_and_the_checker(rm_run, tmp_path):
    """RLMT's wiring on the tiny model: think-format reward, checker and learned reward, all logged."""
    out = tmp_path / "rlmt"
    cli("run", "recipes/rlmt_tiny.yaml", f"rewards.2.path={rm_run}", f"output_dir={out}", "train.steps=2",
        "train.prompts_per_step=4", "eval.num_examples=8", "train.checkpoint_every=0", "threads=1")
    rows = metrics(out)
    assert {"rewards/think_format_reward", "rewards/correctness_reward", "rewards/adapter:reward"} <= rows[0].keys()
    s = summary(out)
    assert {"accuracy", "reward/think_format_reward", "reward/adapter:reward"} <= s["final"].keys()
