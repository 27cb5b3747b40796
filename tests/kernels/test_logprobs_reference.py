"""The chunked reference (CPU path) against the naive full-logits formula: outputs and gradients."""

import pytest
import torch
from lowalign.kernels.logprobs import chunked_logprobs, fused_logprobs, naive_logprobs

SHAPES = [(37, 1000, 24, 0), (64, 384, 32, 4), (5, 77, 8, 2)]  # (N, V, d, lora rank)


def make(N, V, d, r, dtype=torch.float64, bias=True, seed=0, frozen_w=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_()
    x = dict(hidden=t(N, d), weight=t(V, d, scale=d**-0.5), targets=torch.randint(0, V, (N,), generator=g))
    if frozen_w:
        x["weight"].requires_grad_(False)
    if bias:
        x["bias"] = t(V, scale=0.1)
    if r:
        x["lora_a"], x["lora_b"], x["lora_scale"] = t(r, d, scale=0.3), t(V, r, scale=0.3), 1.7
    x["ref_logps"] = (-torch.rand(N, generator=g, dtype=dtype) * 8)
    return x


def near_ref_logps(x, temperature=1.0, softcap=None):
    """(N,) reference log-probs within 0.5 of the policy's on ``make``'s inputs ``x``, as in training. make()'s
    draw from [-8, 0] against a 32k vocabulary's ~-30 puts exp(ref - logp) in k3 near 1e26, past fp16's range."""
    with torch.no_grad():
        lp = naive_logprobs(**{k: v for k, v in x.items() if k != "ref_logps"}, temperature=temperature,
                            softcap=softcap).logps
    return lp + torch.rand(lp.shape[0], generator=torch.Generator().manual_seed(4)) - 0.5


def assert_rel(got, want, tol=1e-5, msg=""):
    """max |got - want| <= tol * max(1, max |want|): relative to the tensor's scale."""
    err = (got.double() - want.double()).abs().max().item()
    scale = max(1.0, want.double().abs().max().item())
    assert err <= tol * scale, f"{msg}: max abs err {err:.3g} > {tol} x {scale:.3g}"


def grads_of(fn, x, w_lp, w_ent, w_kl, **kw):
    out = fn(**x, **kw)
    loss = (out.logps * w_lp).sum() + (out.entropy * w_ent).sum() + (out.kl * w_kl).sum()
    leaves = [k for k, v in x.items() if torch.is_tensor(v) and v.requires_grad]
    gs = torch.autograd.grad(loss, [x[k] for k in leaves])
    return out, dict(zip(leaves, gs))


@pytest.mark.parametrize("N,V,d,r", SHAPES)
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("softcap", [None, 1.5])  # 1.5: small enough that tanh saturates on these logits
def test_chunked_matches_naive(N, V, d, r, est, temperature, softcap):
    x = make(N, V, d, r)
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3)]
    kw = dict(temperature=temperature, kl_estimator=est, with_entropy=True, softcap=softcap)
    o1, g1 = grads_of(naive_logprobs, x, *w, **kw)
    o2, g2 = grads_of(chunked_logprobs, x, *w, chunk_size=7, **kw)
    for a, b in [(o1.logps, o2.logps), (o1.entropy, o2.entropy), (o1.kl, o2.kl)]:
        assert_rel(b, a)
    assert g1.keys() == g2.keys() and {"hidden", "weight", "bias"} <= g1.keys()
    for k in g1:
        assert_rel(g2[k], g1[k], msg=k)


def test_fp32_relative_tolerance_odd_shape():
    x = make(37, 1000, 24, 0, dtype=torch.float32)
    o1, g1 = grads_of(naive_logprobs, x, 1.0, 0.0, 0.0, with_entropy=True)
    o2, g2 = grads_of(fused_logprobs, x, 1.0, 0.0, 0.0, with_entropy=True, impl="reference")
    rel = ((o2.logps - o1.logps).abs() / o1.logps.abs().clamp(min=1e-6)).max()
    assert rel <= 1e-5
    for k in g1:
        assert_rel(g2[k], g1[k], msg=k)


def test_frozen_weight_gets_no_gradient_work():
    x = make(16, 50, 8, 0, frozen_w=True)
    x["bias"].requires_grad_(False)
    out = chunked_logprobs(**x)
    (gh,) = torch.autograd.grad(out.logps.sum(), [x["hidden"]])
    ref = naive_logprobs(**x)
    (gr,) = torch.autograd.grad(ref.logps.sum(), [x["hidden"]])
    assert_rel(gh, gr, msg="hidden")
    assert x["weight"].grad is None


def test_low_precision_inputs_close_to_fp32():
    x32 = make(33, 500, 16, 2, dtype=torch.float32)
    ref = naive_logprobs(**x32, with_entropy=True)
    for dt, tol in [(torch.bfloat16, 0.1), (torch.float16, 0.02)]:
        xl = {k: (v.detach().to(dt) if torch.is_tensor(v) and v.is_floating_point() and k != "ref_logps" else v)
              for k, v in x32.items()}
        out = chunked_logprobs(**xl, with_entropy=True)
        assert out.logps.dtype == torch.float32
        torch.testing.assert_close(out.logps, ref.logps, rtol=tol, atol=tol)


def test_bad_arguments():
    x = make(4, 10, 3, 0)
    with pytest.raises(ValueError, match="kl_estimator"):
        chunked_logprobs(**x, kl_estimator="k4")
    with pytest.raises(ValueError, match="impl"):
        fused_logprobs(**x, impl="cuda-magic")


def test_softcap_is_the_gemma2_formula():
    """naive (the spec) = log_softmax(c tanh(x / c) / T); capping changes the result and bounds the logits."""
    x = make(9, 31, 6, 2)
    kw = {k: x[k] for k in ("hidden", "weight", "targets", "bias", "lora_a", "lora_b")}
    logits = x["hidden"] @ x["weight"].T + x["bias"] + (x["hidden"] @ x["lora_a"].T) @ x["lora_b"].T
    capped = 2.0 * torch.tanh(logits / 2.0)
    want = torch.log_softmax(capped / 0.8, -1).gather(-1, x["targets"][:, None]).squeeze(-1)
    got = naive_logprobs(**kw, softcap=2.0, temperature=0.8).logps
    assert_rel(got, want, 1e-6)  # naive computes in fp32
    assert (naive_logprobs(**kw, temperature=0.8).logps - got).abs().max() > 1e-2
    assert logits.abs().max() > 2.0  # the cap was active


def test_auto_runs_triton_on_cuda_only_for_forward_only_calls(monkeypatch):
    """The dispatch measured on the GPU: Triton's forward is faster than the chunked path, its backward
    slower, so ``auto`` takes Triton on CUDA only when no gradient will flow; the environment overrides."""
    from lowalign.kernels.logprobs import needs_grad, resolve_impl

    monkeypatch.delenv("LOWALIGN_LOGPROB_IMPL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_impl(None, "cuda", needs_grad=False) == "triton"
    assert resolve_impl(None, "cuda", needs_grad=True) == "reference"
    assert resolve_impl(None, "cpu", needs_grad=False) == "reference"
    assert resolve_impl("triton", "cuda", needs_grad=True) == "triton"
    monkeypatch.setenv("LOWALIGN_LOGPROB_IMPL", "triton")
    assert resolve_impl(None, "cuda", needs_grad=True) == "triton"
    h, w = torch.zeros(2, 3, requires_grad=True), torch.zeros(4, 3)
    assert needs_grad(h, w, None) and not needs_grad(w, None)
    with torch.no_grad():
        assert not needs_grad(h, w)
    with torch.inference_mode():
        assert not needs_grad(torch.zeros(1))
