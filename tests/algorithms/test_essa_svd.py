"""The SVD re-parameterization of an existing LoRA is exact, and top-fraction selection freezes the rest."""

import torch

from lowalign.algorithms.essa import SingularValueLoRA
from lowalign.bundle import ModelBundle
from lowalign.config import LoraConfig, ModelConfig

IDS = torch.tensor([[84, 61, 35, 55, 58, 46, 54, 59, 64, 35, 68, 61]])


def _trained_bundle():
    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, A, B, _ in b.lora_factors("policy"):
            A.copy_(torch.randn(A.shape, generator=g) * 0.1)
            B.copy_(torch.randn(B.shape, generator=g) * 0.1)
    return b


def _logits(b):
    with torch.no_grad(), b.use("policy"):
        return b.causal_lm(input_ids=IDS).logits


def test_existing_lora_is_reproduced_exactly_by_its_singular_values():
    b = _trained_bundle()
    before = _logits(b)
    updates = [scale * B @ A for _, A, B, scale in b.lora_factors("policy")]
    sv = SingularValueLoRA(b, fresh=False, seed=0, s_init=0.0, top_fraction=1.0)
    theta = sv.initial_theta()
    assert theta.numel() == 14 * 4 and (theta >= 0).all()
    sv.apply(theta)
    for (_, A, B, scale), dw in zip(b.lora_factors("policy"), updates):
        torch.testing.assert_close(scale * B @ A, dw, atol=1e-5, rtol=1e-4)  # same update, new factors
        torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)  # A = V^T
    torch.testing.assert_close(_logits(b), before, atol=1e-4, rtol=1e-4)
    sv.apply(theta * 0)  # s = 0 -> the base model
    with torch.no_grad(), b.use("reference"):
        ref = b.causal_lm(input_ids=IDS).logits
    torch.testing.assert_close(_logits(b), ref, atol=1e-5, rtol=0)


def test_top_fraction_evolves_only_the_largest_values():
    b = _trained_bundle()
    sv = SingularValueLoRA(b, fresh=False, seed=0, s_init=0.0, top_fraction=0.5)
    theta = sv.initial_theta()
    assert theta.numel() == 14 * 2
    s_all = sv.s0[0]
    torch.testing.assert_close(theta[:2], torch.sort(s_all, descending=True).values[:2])
    sv.apply(theta + 1.0)  # moving theta changes only the selected (largest) directions
    _, A, B, scale = b.lora_factors("policy")[0]
    s_now = torch.linalg.svdvals(scale * B @ A)[:4]  # rank 4: the rest are ~0
    expect = torch.sort(torch.cat([torch.sort(s_all, descending=True).values[:2] + 1, torch.sort(s_all).values[:2]]),
                        descending=True).values
    torch.testing.assert_close(s_now, expect, atol=1e-4, rtol=1e-4)
