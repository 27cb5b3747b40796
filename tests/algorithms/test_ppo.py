"""PPO end to end: outputs of both critic modes, four roles on one nf4 base, exact resume, early errors."""

import json

import pytest
import torch

from .helpers import cli, kill_after_checkpoint, metrics, same_adapters, summary

SMALL = ["eval.num_examples=24", "train.prompts_per_step=8", "train.ppo_epochs=2", "train.num_mini_batches=2",
         "threads=1"]
DETERMINISTIC_KEYS = ("reward", "kl", "policy_loss", "value_loss", "grad_norm", "explained_variance",
                      "approx_kl", "kl_coef", "completion_length")


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_run_writes_everything(tmp_path, critic):
    out = tmp_path / "run"
    cli("run", "recipes/ppo_tiny.yaml", f"output_dir={out}", "train.steps=3", "train.checkpoint_every=3",
        f"train.critic={critic}", "train.adaptive_kl=true", "train.target_kl=0.01", "train.kl_horizon=10",
        "train.reward_norm=true", "train.missing_eos_penalty=1.0", "train.micro_batch_size=2", "eval.every=2", *SMALL)
    s, rows = summary(out), metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and s["critic"] == critic
    assert {"eval/accuracy", "eval/reward"} <= rows[1].keys() and "eval/reward" not in rows[0]  # eval.every=2
    assert {"accuracy", "reward", "reward/correctness_reward"} <= s["final"].keys()
    for key in ("reward", "kl", "kl_coef", "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac",
                "approx_kl", "explained_variance", "eos_fraction", "rewards/correctness_reward"):
        assert key in rows[0], key
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] != 0.0  # policy = reference at step 1 only
    # kl above the (tiny) target raises the coefficient, below it lowers it: the controller moved
    assert rows[-1]["kl_coef"] != rows[0]["kl_coef"] and s["final_kl_coef"] != rows[0]["kl_coef"]
    adapters = out / "adapters"
    assert (adapters / "policy" / "adapter_model.safetensors").exists()
    assert (adapters / "value").exists() == (critic == "separate")
    from safetensors.torch import load_file

    heads = load_file(str(adapters / "heads.safetensors"))
    assert heads["value.weight"].shape == (1, 256) and heads["value.weight"].abs().sum() > 0  # the critic trained


def _reward_run(tmp_path) -> str:
    """A reward_model run directory (adapter + head + meta) made in-process, with non-trivial weights."""
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig

    b = ModelBundle.load(ModelConfig(quantization="nf4"))
    b.add_adapter("reward", LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    for _, _, B, _ in b.lora_factors("reward"):
        B.data.normal_(0, 0.05)
    b.add_head("reward", 1)
    d = tmp_path / "rm" / "adapters"
    b.save_adapter("reward", d / "reward")
    b.save_heads(d / "heads.safetensors")
    (d / "reward_meta.json").write_text(json.dumps({"adapter": "reward", "weights": None}))
    return str(tmp_path / "rm")


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_four_roles_use_one_nf4_base(tmp_path, monkeypatch, critic):
    """One PPO step uses policy, value, reward and reference; every backbone pass reads the same base
    tensors (data_ptrs), there is exactly one of each, and the model is loaded from disk once."""
    import transformers

    import lowalign
    from lowalign.bundle import ModelBundle

    rm = _reward_run(tmp_path)
    seen = {}  # (role, active adapter) -> sorted data_ptrs of every base (non-LoRA) parameter
    heads_called, loads = set(), []
    orig_hidden, orig_add_head = ModelBundle.hidden_states, ModelBundle.add_head
    orig_load = transformers.AutoModelForCausalLM.from_pretrained

    def hidden_states(self, input_ids, attention_mask):
        seen[(self.role, self._adapter)] = sorted(p.data_ptr() for n, p in self.base.named_parameters()
                                                  if "lora_" not in n)
        return orig_hidden(self, input_ids, attention_mask)

    def add_head(self, name, out_features=1):
        head = orig_add_head(self, name, out_features)
        head.register_forward_hook(lambda *_: heads_called.add(name))
        return head

    def from_pretrained(*a, **k):
        loads.append(a)
        return orig_load(*a, **k)

    monkeypatch.setattr(ModelBundle, "hidden_states", hidden_states)
    monkeypatch.setattr(ModelBundle, "add_head", add_head)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    s = lowalign.run("recipes/ppo_tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", "model.quantization=nf4", f"train.critic={critic}", "train.steps=1",
        "eval.num_examples=4", "train.prompts_per_step=4", "train.ppo_epochs=1", "train.num_mini_batches=1",
        f"rewards=[{{adapter: reward, path: '{rm}', weight: 1.0}}, "
        "{fn: 'lowalign.tasks.arithmetic:correctness_reward', weight: 1.0}]"], quiet=True)
    roles = {role for role, _ in seen}
    assert roles == {"policy", "reward", "reference"} | ({"value"} if critic == "separate" else set())
    assert "value" in heads_called and "reward" in heads_called
    ptr_sets = list(seen.values())
    assert all(p == ptr_sets[0] for p in ptr_sets)  # every role reads the very same base tensors
    assert len(set(ptr_sets[0])) == len(ptr_sets[0])  # and none of them twice
    assert len(loads) == 1  # the base came from disk once
    mem = s["memory"]
    assert mem["base"] > 0 and "adapter:policy" in mem and "adapter:reward" in mem
    assert ("adapter:value" in mem) == (critic == "separate")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    args = ["recipes/ppo_tiny.yaml", "train.steps=8", "train.checkpoint_every=2", "train.adaptive_kl=true",
            "train.target_kl=0.05", "train.kl_horizon=20", "train.reward_norm=true", *SMALL]
    full, killed = tmp_path / "full", tmp_path / "killed"
    cli("run", *args, f"output_dir={full}")
    kill_after_checkpoint(args, killed, "step_000004", "step_000008")
    cli("run", str(killed))
    assert same_adapters(full, killed, "policy") and same_adapters(full, killed, "value")
    ma, mb = metrics(full), metrics(killed)
    assert [r["step"] for r in mb] == list(range(1, 9))
    for ra, rb in zip(ma, mb):
        assert {k: ra.get(k) for k in DETERMINISTIC_KEYS} == {k: rb.get(k) for k in DETERMINISTIC_KEYS}
    assert len({r["kl_coef"] for r in ma}) > 2  # the restored controller state was exercised
    assert summary(full)["final"]["accuracy"] == summary(killed)["final"]["accuracy"]


@pytest.mark.parametrize("override,message", [
    ("train.num_mini_batches=3", r"train\.num_mini_batches: 3 does not divide the batch of 64"),
    ("rewards=[]", r"rewards: PPO needs at least one reward source"),
    ("train.micro_batch_size=5", r"train\.micro_batch_size: 5 does not divide the minibatch of 32"),
])
def test_bad_config_fails_before_anything_is_created(tmp_path, override, message):
    import re

    p = cli("validate", "recipes/ppo_tiny.yaml", override, check=False)
    assert p.returncode == 2 and re.search(message, p.stderr), p.stderr
    p = cli("run", "recipes/ppo_tiny.yaml", override, f"output_dir={tmp_path / 'run'}", check=False)
    assert p.returncode == 2 and re.search(message, p.stderr)
    assert not (tmp_path / "run").exists()


def test_split_backward_equals_joint_backward():
    """Separate critic: policy half then value half (graphs never coexist) gives the joint gradients."""
    from lowalign.algorithms.ppo import VALUE, PPOConfig, Roles, _backward_micro, policy_and_values
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.generation import encode_completions
    from lowalign.losses import ppo_loss

    torch.manual_seed(0)
    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig(r=4))
    b.add_adapter(VALUE, LoraConfig(r=4))
    b.add_head(VALUE, 1)
    for name in ("policy", VALUE):
        for _, _, B, _ in b.lora_factors(name):
            B.data.normal_(0, 0.05)
    tc = PPOConfig()
    roll = encode_completions(b.tokenizer, ["Q: 1+2= A:", "Q: 33+4= A:"], ["3", "37"], b.device)
    cmask = roll.completion_mask.float()
    shape = cmask.shape
    old_lp, adv, old_v, ret = (torch.randn(shape) * 0.3 for _ in range(4))
    params = b.adapter_parameters("policy") + b.adapter_parameters(VALUE) + list(b.heads.parameters())
    rows = torch.arange(2)
    roles = Roles.shared(b, "separate")
    out = _backward_micro(roles, roll, rows, tc, old_lp, adv, old_v, ret, cmask, cmask.sum())  # the token mean
    split = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    lp, v = policy_and_values(roles, roll, rows, tc)
    joint = ppo_loss(lp, old_lp, adv, v, old_v, ret, cmask, clip=tc.clip, value_clip=tc.value_clip,
                     vf_coef=tc.vf_coef)
    joint.loss.backward()
    assert torch.allclose(out.loss.detach(), joint.loss.detach(), atol=1e-6)
    assert sum(g.abs().sum() for g in split) > 0
    for g, p in zip(split, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_pf_ppo_updates_on_the_kept_samples_and_logs_the_filter(tmp_path):
    out = tmp_path / "pf"
    cli("run", "recipes/pfppo_tiny.yaml", "train.steps=3", "train.prompts_per_step=8", *SMALL, f"output_dir={out}")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["filter/kept_fraction"] == 0.5  # best + one random of 4
        assert r["filter/score_kept_mean"] >= r["filter/score_all_mean"] - 1e-6  # the best is always kept
        assert r["score"] == pytest.approx(r["filter/score_kept_mean"])  # PPO's score is the kept samples'
    p = cli("validate", "recipes/pfppo_tiny.yaml", "train.num_generations=1", check=False)
    assert p.returncode == 2 and "train.filter: best_random chooses among each prompt's samples" in p.stderr
    p = cli("validate", "recipes/pfppo_tiny.yaml", "train.prompts_per_step=3", "train.num_mini_batches=4",
            check=False)
    assert p.returncode == 2 and "does not divide the batch of 6 (prompts_per_step x the samples" in p.stderr


def test_pf_ppo_r2_of_a_learned_reward_against_the_checker():
    from types import SimpleNamespace

    from lowalign.algorithms.ppo import filter_metrics
    from lowalign.distributed import SINGLE
    from lowalign.losses.filtering import r_squared
    from lowalign.rewards import RewardBatch

    learned = torch.tensor([0.9, 0.1, 0.8, 0.3, 0.2, 0.7])
    texts, answers = ["5", "4", "7", "1", "2", "3"], ["5", "5", "7", "7", "2", "2"]  # right: rows 0, 2, 4
    rb = RewardBatch(learned, {"rm": learned})
    rewards = SimpleNamespace(sources=[("rm", 1.0, None, "reward")])
    keep = torch.tensor([True, True, True, False, True, False])
    m = filter_metrics(SINGLE, rb, rewards, learned, keep, texts, {"answer": answers}, lambda t, a: t == a)
    truth = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert m["filter/r2"] == pytest.approx(r_squared(learned[keep], truth).item())
    assert m["filter/kept_fraction"] == pytest.approx(4 / 6)
    fn_only = SimpleNamespace(sources=[("correctness", 1.0, print, None)])  # no learned reward: no R^2
    assert "filter/r2" not in filter_metrics(SINGLE, rb, fn_only, learned, keep, texts, {"answer": answers}, None)


def rto_recipe(tmp_path, dpo_dir, noise: float, name="rto.yaml"):
    """ppo_tiny plus a dpo_adapter reward: a saved adapter with random B of size ``noise`` (0: the reference
    itself) standing in for a DPO run's policy."""
    import yaml

    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig

    b = ModelBundle.load(ModelConfig(name_or_path="builtin:tiny", dtype="float32"))
    b.add_adapter("policy", LoraConfig(r=8, alpha=16))
    torch.manual_seed(3)
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, noise) if noise else B.data.zero_()
    b.save_adapter("policy", dpo_dir / "adapters" / "policy")
    raw = yaml.safe_load(open("recipes/ppo_tiny.yaml"))
    raw["rewards"] = [{"dpo_adapter": str(dpo_dir), "weight": 0.5}, *raw["rewards"]]
    f = tmp_path / name
    f.write_text(yaml.safe_dump(raw))
    return f


def test_rto_with_the_reference_as_its_dpo_policy_is_ppo(tmp_path):
    """The dense reward beta (log pi_dpo - log pi_ref) is exactly 0 when the DPO adapter computes the reference
    (B = 0): the run equals plain PPO, metric for metric and weight for weight."""
    recipe = rto_recipe(tmp_path, tmp_path / "dpo_zero", noise=0.0)
    args = ["train.steps=3", *SMALL, "train.checkpoint_every=0"]
    cli("run", recipe, *args, f"output_dir={tmp_path / 'rto'}")
    cli("run", "recipes/ppo_tiny.yaml", *args, f"output_dir={tmp_path / 'ppo'}")
    ma, mb = metrics(tmp_path / "rto"), metrics(tmp_path / "ppo")
    assert all(r["rto/dense_reward"] == 0.0 for r in ma)
    for ra, rb in zip(ma, mb):
        assert {k: ra[k] for k in DETERMINISTIC_KEYS} == {k: rb[k] for k in DETERMINISTIC_KEYS}
    assert same_adapters(tmp_path / "rto", tmp_path / "ppo", "policy")
    assert same_adapters(tmp_path / "rto", tmp_path / "ppo", "value")


def test_rto_runs_five_roles_on_one_base_and_resumes_exactly(tmp_path):
    recipe = rto_recipe(tmp_path, tmp_path / "dpo", noise=0.05)
    args = [str(recipe), "train.steps=6", "train.checkpoint_every=2", *SMALL]
    full, killed = tmp_path / "full", tmp_path / "killed"
    cli("run", *args, f"output_dir={full}")
    rows = metrics(full)
    assert all(r["rto/dense_reward"] != 0.0 for r in rows)
    mem = summary(full)["memory"]
    assert {"adapter:policy", "adapter:value", "adapter:dpo0"} <= mem.keys()  # the base itself is counted once
    kill_after_checkpoint(args, killed, "step_000002", "step_000006")
    cli("run", str(killed))
    assert same_adapters(full, killed, "policy") and same_adapters(full, killed, "value")
    for ra, rb in zip(rows, metrics(killed)):
        assert {k: ra[k] for k in (*DETERMINISTIC_KEYS, "rto/dense_reward")} == \
            {k: rb[k] for k in (*DETERMINISTIC_KEYS, "rto/dense_reward")}


@pytest.mark.parametrize("reward,message", [
    ({"dpo_adapter": "recipes"}, r"rewards\[0\]\.dpo_adapter: recipes holds no saved adapter"),
    ({"dpo_adapter": "recipes", "fn": "lowalign.tasks.arithmetic:correctness_reward"},
     r"rewards\[0\]: give exactly one of 'fn', 'adapter' or 'dpo_adapter'"),
])
def test_bad_rto_rewards_are_refused_before_anything_loads(tmp_path, reward, message):
    import re

    import yaml

    raw = yaml.safe_load(open("recipes/ppo_tiny.yaml"))
    raw["rewards"] = [reward, *raw["rewards"]]
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(raw))
    p = cli("validate", f, check=False)
    assert p.returncode == 2 and re.search(message, p.stderr), p.stderr


def test_a_dpo_adapter_reward_outside_ppo_is_refused(tmp_path):
    import yaml

    raw = yaml.safe_load(open("recipes/grpo_tiny.yaml"))
    raw["rewards"] = [{"dpo_adapter": str(tmp_path)}, *raw["rewards"]]
    f = tmp_path / "g.yaml"
    f.write_text(yaml.safe_dump(raw))
    p = cli("validate", f, check=False)
    assert p.returncode == 2 and "dpo_adapter: a per-token reward (RTO) is for algorithm: ppo" in p.stderr


def test_ppo_c_moves_scores_by_stated_confidence_and_resumes_exactly(tmp_path):
    """PPO-C on the tiny model with a stand-in parser (it states no confidence itself): scores move from the
    raw rewards, the running mean of past scores is checkpointed, and a killed run resumes to the same end."""
    keys = (*DETERMINISTIC_KEYS, "score", "calibration/shift_mean", "calibration/running_mean")
    args = ["recipes/ppo_c_tiny.yaml", "train.steps=6", "train.checkpoint_every=2",
            "train.confidence_parser=tests.algorithms.helpers:length_confidence", *SMALL]
    full, killed = tmp_path / "full", tmp_path / "killed"
    cli("run", *args, f"output_dir={full}")
    rows = metrics(full)
    assert all(0 < r["calibration/stated_fraction"] <= 1 for r in rows)
    assert any(r["calibration/shift_mean"] != 0 for r in rows)
    assert rows[0]["calibration/running_mean"] == pytest.approx(rows[0]["reward"])  # step 1: its own batch
    assert rows[1]["calibration/running_mean"] == pytest.approx(rows[0]["reward"])  # then the past batches
    kill_after_checkpoint(args, killed, "step_000002", "step_000006")
    cli("run", str(killed))
    assert same_adapters(full, killed, "policy")
    assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in metrics(killed)]


def test_ppo_c_on_the_default_parser_and_a_bad_parser(tmp_path):
    out = tmp_path / "c"
    cli("run", "recipes/ppo_c_tiny.yaml", "train.steps=2", *SMALL, f"output_dir={out}")
    assert all(r["calibration/stated_fraction"] == 0 and r["calibration/shift_mean"] == 0 for r in metrics(out))
    p = cli("validate", "recipes/ppo_c_tiny.yaml", "train.confidence_parser=lowalign.rewards:nope", check=False)
    assert p.returncode == 2 and "train.confidence_parser: 'lowalign.rewards' has no callable 'nope'" in p.stderr
