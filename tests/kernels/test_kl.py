"""The fused full-vocabulary KL(reference || policy): chunked reference and Triton (TRITON_INTERPRET=1 on CPU)
against ``kl_div`` on full logits, forward and backward, at odd shapes and several dtypes; and its memory."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from lowalign.kernels.kl import chunked_kl, fused_kl, naive_kl

from .test_logprobs_reference import assert_rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def make(N, V, d, r=0, ref_r=0, dtype=torch.float64, bias=True, seed=0, frozen_w=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_()
    x = dict(hidden=t(N, d), ref_hidden=(t(N, d) * 0.5).detach(), weight=t(V, d, scale=d**-0.5),
             targets=torch.randint(0, V, (N,), generator=g))
    x["ref_hidden"] += x["hidden"].detach()  # a nearby reference, as an adapter's is
    if frozen_w:
        x["weight"].requires_grad_(False)
    if bias:
        x["bias"] = t(V, scale=0.1)
    if r:
        x["lora_a"], x["lora_b"], x["lora_scale"] = t(r, d, scale=0.3), t(V, r, scale=0.3), 1.7
    if ref_r:
        x["ref_lora_a"], x["ref_lora_b"] = t(ref_r, d, scale=0.3).detach(), t(V, ref_r, scale=0.3).detach()
        x["ref_lora_scale"] = 0.6
    # built on the CPU's generator (the same numbers everywhere), then moved to where the kernels run
    return {k: v.detach().to(DEVICE).requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
            for k, v in x.items()}


def run(fn, x, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    N = x["hidden"].shape[0]
    w_kl, w_lp = torch.randn(N, generator=g).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)
    out = fn(**x, **kw)
    loss = (out.kl * w_kl.to(out.kl)).sum() + (out.logps * w_lp.to(out.kl)).sum()
    leaves = [k for k, v in x.items() if torch.is_tensor(v) and v.requires_grad]
    return out, dict(zip(leaves, torch.autograd.grad(loss, [x[k] for k in leaves])))


IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="GPU or interpreter"))]


def test_naive_is_the_textbook_kl():
    x = make(5, 11, 4)
    out = naive_kl(**x)
    logits_p = x["hidden"] @ x["weight"].T + x["bias"]
    logits_q = x["ref_hidden"] @ x["weight"].T + x["bias"]
    P, Q = logits_p.softmax(-1), logits_q.softmax(-1)
    torch.testing.assert_close(out.kl, (Q * (Q.log() - P.log())).sum(-1).float())
    assert (out.kl >= 0).all() and out.logps.shape == (5,)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,V,d,r,ref_r", [(37, 1000, 24, 0, 0), (21, 67, 8, 4, 0), (5, 77, 8, 2, 3),
                                           (13, 45, 16, 0, 2)])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (0.9, 1.5)])
def test_matches_kl_div_on_full_logits(impl, N, V, d, r, ref_r, temperature, softcap):
    dtype = torch.float64 if impl == "reference" else torch.float32
    x = make(N, V, d, r, ref_r, dtype=dtype)
    kw = dict(temperature=temperature, softcap=softcap)
    o_ref, g_ref = run(naive_kl, x, **kw)
    o, g = run(lambda **a: fused_kl(**a, impl=impl), x, **kw)
    tol = 1e-5  # both compute in fp32
    for name in ("kl", "logps", "ref_logps"):
        assert getattr(o, name).dtype == torch.float32
        assert_rel(getattr(o, name), getattr(o_ref, name), tol, name)
    assert g.keys() == g_ref.keys() and "ref_hidden" not in g
    for k in g_ref:
        assert_rel(g[k], g_ref[k], tol, k)


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_sides_give_zero_kl_and_no_kl_gradient(impl):
    x = make(9, 50, 8, dtype=torch.float32)
    x["ref_hidden"] = x["hidden"].detach().clone()
    out = fused_kl(**x, impl=impl)
    assert out.kl.abs().max() < 1e-5
    torch.testing.assert_close(out.logps.detach(), out.ref_logps)
    (gh,) = torch.autograd.grad(out.kl.sum(), x["hidden"])
    assert gh.abs().max() < 1e-5  # dKL/dz = P - Q = 0


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_head_gets_no_weight_gradient(impl):
    x = make(19, 50, 16, bias=False, frozen_w=True, dtype=torch.float32)
    _, g = run(lambda **a: fused_kl(**a, impl=impl), x)
    assert set(g) == {"hidden"}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(impl, dtype):
    x = make(17, 45, 16, 2, dtype=torch.float32)
    xh = {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
              else v) for k, v in x.items()}
    xr = {k: (v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
              else v) for k, v in xh.items()}  # the check sees the same rounded inputs, in fp32
    o_ref, g_ref = run(naive_kl, xr)
    o, g = run(lambda **a: fused_kl(**a, impl=impl), xh)
    # half inputs multiply in their own dtype (the reference path and tensor cores); the interpreter upcasts
    exact = impl == "triton" and DEVICE == "cpu"
    assert_rel(o.kl, o_ref.kl, 1e-5 if exact else 2e-2, "kl")
    for k in g_ref:
        assert g[k].dtype == dtype
        assert_rel(g[k].float(), g_ref[k], 8e-3 if exact or dtype == torch.float16 else 3e-2, k)


def test_chunk_boundaries_do_not_matter():
    x = make(37, 100, 8, 2, dtype=torch.float64)
    a, ga = run(chunked_kl, x, chunk_size=5)
    b, gb = run(chunked_kl, x, chunk_size=64)
    torch.testing.assert_close(a.kl, b.kl)
    for k in ga:  # fp32 sums over a different number of chunks: rounding only
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-6, atol=1e-6)


def test_bad_arguments():
    x = make(4, 10, 3)
    with pytest.raises(ValueError, match="must match"):
        chunked_kl(**{**x, "ref_hidden": x["ref_hidden"][:3]})
    with pytest.raises(ValueError, match="both LoRA factors"):
        chunked_kl(**x, ref_lora_a=torch.zeros(2, 3, device=DEVICE))


MEMORY_SCRIPT = textwrap.dedent("""
    import re, sys, torch
    from lowalign.kernels.kl import fused_kl

    def peak():  # VmHWM: this process's own peak RSS (ru_maxrss starts at the parent's at fork, and a test
        # worker that ran the real models first is larger than anything measured here)
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    torch.set_num_threads(1)
    impl, N, V, d = sys.argv[1], 4096, 32000, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=g).requires_grad_()
    ref = torch.randn(N, d, generator=g)
    w = torch.randn(V, d, generator=g) * d ** -0.5
    y = torch.randint(0, V, (N,), generator=g)
    out = fused_kl(h[:8], ref[:8], w, y[:8], impl=impl)  # warm up allocator and libraries
    out.kl.sum().backward()
    base = peak()
    out = fused_kl(h, ref, w, y, impl=impl)
    (out.kl.sum() + out.logps.sum()).backward()
    print(peak() - base)
""")


def _peak_growth(impl: str) -> int:
    p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, impl], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LOWALIGN_LOGPROB_IMPL": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split()[-1])


def test_peak_memory_below_half_of_one_logits_tensor():
    """32k vocabulary, 4096 tokens: one fp32 [N x V] logits tensor is 500 MiB. The fused KL's forward and
    backward together must grow the process's peak by less than half of that; the full-logits path, for
    contrast (and to show the measurement sees such tensors), grows it by more than one."""
    logits = 4096 * 32000 * 4
    fused = _peak_growth("reference")
    assert fused < logits / 2, f"fused KL peak growth {fused / 2**20:.0f} MiB >= {logits / 2**21:.0f} MiB"
    naive = _peak_growth("naive")
    assert naive > logits, f"full-logits path grew the peak by only {naive / 2**20:.0f} MiB"
