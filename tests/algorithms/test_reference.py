"""`reference: init`: when the policy starts from a trained adapter, the reference is that starting adapter
(frozen, on the same base), so at step 0 reference and policy log-probs are equal, for GRPO, DPO and PPO."""

import math

import pytest
import torch

from .helpers import cli, metrics


@pytest.fixture(scope="module")
def start_adapter(tmp_path_factory):
    """A saved PEFT adapter far enough from zero that adapters-off differs from it."""
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig

    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig())  # the recipes' r=16, alpha=32
    torch.manual_seed(0)
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, 0.02)
    d = tmp_path_factory.mktemp("start") / "policy"
    b.save_adapter("policy", d)
    return d


COMMON = ["train.steps=1", "eval.num_examples=8", "threads=1", "train.checkpoint_every=0"]
RUNS = {
    "grpo": ("recipes/grpo_tiny.yaml", ["train.beta=0.04", "train.prompts_per_step=4", "train.num_generations=4"]),
    "ppo": ("recipes/ppo_tiny.yaml", ["train.prompts_per_step=8", "train.ppo_epochs=1"]),
    "dpo": ("recipes/dpo_tiny.yaml", ["data.num_pairs=32", "train.eval_pairs=8", "train.batch_size=8"]),
}


def _first_row(tmp_path, algo, start_adapter, *extra):
    recipe, args = RUNS[algo]
    out = tmp_path / f"{algo}-{len(extra)}"
    cli("run", recipe, f"output_dir={out}", f"lora.init_from={start_adapter}", *args, *COMMON, *extra)
    return metrics(out)[0]


@pytest.mark.parametrize("algo", sorted(RUNS))
def test_reference_is_the_starting_adapter(tmp_path, algo, start_adapter):
    row = _first_row(tmp_path, algo, start_adapter)  # reference: auto -> init, since init_from is set
    if algo == "dpo":
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert abs(row["rewards/margin"]) < 1e-5
    else:
        assert abs(row["kl"]) < 1e-6
    base = _first_row(tmp_path, algo, start_adapter, "reference=base")  # the old behaviour, now opt-in
    if algo == "dpo":
        assert abs(base["rewards/margin"]) > 1e-3
    else:
        assert abs(base["kl"]) > 1e-3


def test_bundle_reference_adapter_is_frozen_and_stays_put(start_adapter):
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.logprobs import token_logprobs

    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig(), init_from=str(start_adapter))
    b.set_reference_adapter(start_adapter)
    assert b.role == "policy"  # adding the reference adapter leaves the active role alone
    ids = torch.tensor([[84, 61, 35, 55, 58, 46, 54, 59, 64, 35, 68, 61]])
    mask, tmask = torch.ones_like(ids), torch.ones_like(ids)
    tmask[:, 0] = 0

    def lp(role):
        with b.use(role):
            return token_logprobs(b, ids, mask, tmask).logps

    with torch.no_grad():
        ref0, pol0 = lp("reference"), lp("policy")
    torch.testing.assert_close(ref0, pol0, rtol=0, atol=0)
    with b.use("reference"):
        assert not any(p.requires_grad for p in b.adapter_parameters("init_reference"))
    opt = torch.optim.SGD(b.adapter_parameters("policy"), lr=0.5)
    (-lp("policy").sum()).backward()
    opt.step()
    with torch.no_grad():
        assert (lp("policy") - pol0).abs().max() > 1e-3
        torch.testing.assert_close(lp("reference"), ref0, rtol=0, atol=0)
    rep = b.memory_report()
    assert rep["adapter:init_reference"] == rep["adapter:policy"]  # one adapter's bytes, not a second base
