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

    torch.manual_seed(0)  # before add_adapter: PEFT draws lora_A from the global generator
    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig())  # the recipes' r=16, alpha=32
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


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory):
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig

    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig())
    torch.manual_seed(1)
    for _, A, B, _ in b.lora_factors("policy"):
        A.data.normal_(0, 0.05)
        B.data.normal_(0, 0.03)
    d = tmp_path_factory.mktemp("second") / "policy"
    b.save_adapter("policy", d)
    return d


def test_soup_reference_equals_a_base_merged_with_the_averaged_adapter(start_adapter, second_adapter):
    """`reference: soup`: the reference role's log-probs equal those of a plain model whose weights were merged
    with the element-wise average of the adapters, and the bundle holds the base once."""
    from safetensors.torch import load_file

    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.logprobs import token_logprobs

    b = ModelBundle.load(ModelConfig())
    base_numel = sum(p.numel() for p in b.base.parameters())
    b.add_adapter("policy", LoraConfig())
    b.set_reference_soup([start_adapter, second_adapter])
    ids = torch.tensor([[84, 61, 35, 55, 58, 46, 54, 59, 64, 35, 68, 61]])
    mask, tmask = torch.ones_like(ids), torch.ones_like(ids)
    tmask[:, 0] = 0
    with torch.no_grad(), b.use("reference"):
        soup = token_logprobs(b, ids, mask, tmask).logps[:, 1:]

    # independently: average the two files' tensors, load them as an adapter of a fresh model, merge, forward
    ref = ModelBundle.load(ModelConfig())
    ref.add_adapter("avg", LoraConfig())
    s1, s2 = (load_file(str(d / "adapter_model.safetensors")) for d in (start_adapter, second_adapter))
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(ref.peft, {k: (s1[k] + s2[k]) / 2 for k in s1}, adapter_name="avg")
    merged = ref.peft.merge_and_unload()
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=mask).logits.float()
    want = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(soup, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), b.use("policy"):  # and it is neither the fresh policy nor either ingredient
        assert (token_logprobs(b, ids, mask, tmask).logps[:, 1:] - soup).abs().max() > 1e-3
    lora = sum(p.numel() for n, p in b.base.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in b.base.parameters()) - lora == base_numel  # one base, adapters on top
    with b.use("reference"):
        assert not any(p.requires_grad for p in b.adapter_parameters("init_reference"))


@pytest.mark.parametrize("algo", sorted(RUNS))
def test_soup_of_the_starting_adapter_is_the_starting_adapter(tmp_path, algo, start_adapter):
    """End to end for GRPO, DPO and PPO: a soup of two copies of the starting adapter is that adapter, so
    at step 1 the policy (started from it) equals the reference."""
    row = _first_row(tmp_path, algo, start_adapter, "reference=soup",
                     f"reference_soup=[{start_adapter}, {start_adapter}]")
    if algo == "dpo":
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-5)
    else:
        assert abs(row["kl"]) < 1e-6


def test_soup_config_errors_before_any_model_loads(tmp_path, start_adapter):
    import json
    import shutil

    p = cli("validate", "recipes/dpo_tiny.yaml", "reference=soup", check=False)
    assert p.returncode == 2 and "reference_soup" in p.stderr
    p = cli("validate", "recipes/dpo_tiny.yaml", "reference=soup", f"reference_soup=[{tmp_path}]", check=False)
    assert p.returncode == 2 and "reference_soup[0]: no saved adapter" in p.stderr
    other = tmp_path / "r8"
    shutil.copytree(start_adapter, other)
    c = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**c, "r": 8}))
    p = cli("validate", "recipes/dpo_tiny.yaml", "reference=soup", f"reference_soup=[{start_adapter}, {other}]",
            check=False)
    assert p.returncode == 2 and "reference_soup[1]: rank 8" in p.stderr
