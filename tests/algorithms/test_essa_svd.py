"""The SVD re-parameterization of an existing LoRA is exact, and top-fraction selection freezes the rest."""

import pytest
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


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_fresh_lora_spans_the_base_weights_top_singular_directions(quantization):
    """subspace=base: a fresh adapter's update is U diag(s) V^T with U, V the top-r singular vectors of the
    weight the base layer applies (nf4: its dequantized weight, read here with bitsandbytes itself). Checked by
    what it does: s = -(top r singular values) removes them, leaving the (r+1)-th as the largest."""
    b = ModelBundle.load(ModelConfig(quantization=quantization))
    b.add_adapter("policy", LoraConfig(r=4, alpha=8))
    sv = SingularValueLoRA(b, fresh=True, seed=0, s_init=0.0, top_fraction=1.0, subspace="base")
    theta0 = sv.initial_theta()
    assert theta0.numel() == 14 * 4 and (theta0 == 0).all()
    before = _logits(b)
    with torch.no_grad(), b.use("reference"):
        torch.testing.assert_close(before, b.causal_lm(input_ids=IDS).logits, atol=1e-6, rtol=0)  # s = 0: base
    weights = []
    for name, *_ in b.lora_factors("policy"):
        layer = b.base.get_submodule(name).get_base_layer()
        if quantization == "nf4":
            import bitsandbytes.functional as bnbf

            weights.append(bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float())
        else:
            weights.append(layer.weight.float())
    top = torch.cat([torch.linalg.svdvals(W)[:4] for W in weights])
    sv.apply(-top)
    for W, (_, A, B, scale) in zip(weights, b.lora_factors("policy")):
        s = torch.linalg.svdvals(W)
        torch.testing.assert_close(torch.linalg.svdvals(W + scale * B @ A)[0], s[4], atol=1e-4, rtol=1e-4)


def test_random_subspace_is_orthonormal_and_seeded():
    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig(r=4, alpha=8))
    sv = SingularValueLoRA(b, fresh=True, seed=3, s_init=0.5, top_fraction=1.0, subspace="random")
    A0 = [A.clone() for _, A, _, _ in b.lora_factors("policy")]
    for (_, A, _, _), U in zip(b.lora_factors("policy"), sv.U):
        torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(U.T @ U, torch.eye(4), atol=1e-5, rtol=0)
    SingularValueLoRA(b, fresh=True, seed=3, s_init=0.5, top_fraction=1.0, subspace="random")
    assert all(torch.equal(a, A) for a, (_, A, _, _) in zip(A0, b.lora_factors("policy")))


@pytest.mark.parametrize("shape", [(300, 200), (1100, 1300)])
def test_top_singular_vectors_exact_and_randomized(shape):
    """Small matrices take the exact SVD, large ones (min side > 1024) the seeded randomized one: both return
    the top-r singular values and the subspaces they span, checked against a matrix built with known ones."""
    from lowalign.algorithms.essa import top_singular_vectors

    g = torch.Generator().manual_seed(0)
    m, n = shape
    k = min(m, n)
    U0 = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V0 = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    s0 = torch.cat([torch.tensor([50.0, 40, 30, 20]), 0.01 * torch.rand(k - 4, generator=g)])
    W = U0 @ torch.diag(s0) @ V0.T
    U, s, Vh = top_singular_vectors(W, 4, seed=1)
    assert U.shape == (m, 4) and s.shape == (4,) and Vh.shape == (4, n)
    torch.testing.assert_close(s, s0[:4], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(U @ U.T, U0[:, :4] @ U0[:, :4].T, atol=1e-4, rtol=0)  # same column space
    torch.testing.assert_close(Vh.T @ Vh, V0[:, :4] @ V0[:, :4].T, atol=1e-4, rtol=0)
    U2, s2, Vh2 = top_singular_vectors(W, 4, seed=1)
    assert torch.equal(U, U2) and torch.equal(s, s2) and torch.equal(Vh, Vh2)  # seeded: the same every call
