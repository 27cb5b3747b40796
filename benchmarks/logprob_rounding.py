"""How far is fp32 from fp64 for the fused log-prob gradients at a GPU test's size? The yardstick for the fp32
tolerance of ``tests/kernels/test_logprobs_triton.py::test_gpu_sizes``.

    PYTHONPATH=. .venv/bin/python benchmarks/logprob_rounding.py            # 1031 x 32003 x 256, LoRA r8 (CPU)

The inputs are the test's own (``make`` and ``near_ref_logps``, as ``_check(..., ref_near=True)``). The fp64
yardstick is the formula written out here in float64 (``naive_logprobs`` computes in fp32 whatever its inputs). For each
gradient, the table gives max |fp32 - fp64| / max |fp64| for the full-logits path (``naive_logprobs``) and
for the chunked path (the CPU path).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
from lowalign.kernels.logprobs import fused_logprobs, naive_logprobs

from tests.kernels.test_logprobs_reference import grads_of, make, near_ref_logps


def fp64_logprobs(hidden, weight, targets, *, bias, ref_logps, temperature, kl_estimator, with_entropy,
                  lora_a=None, lora_b=None, lora_scale=1.0):
    """Log-probs, entropy and k3 KL from full float64 logits: logits = H W^T + b + s (H A^T) B^T."""
    assert kl_estimator == "k3" and with_entropy
    logits = hidden @ weight.T + bias
    if lora_a is not None:
        logits = logits + lora_scale * (hidden @ lora_a.T) @ lora_b.T
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, -1)
    logps = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    d = ref_logps - logps
    return SimpleNamespace(logps=logps, entropy=-(logp_all.exp() * logp_all).sum(-1), kl=d.exp() - d - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1031x32003x256x8", help="N x V x d x LoRA rank")
    N, V, d, r = (int(x) for x in ap.parse_args().shape.split("x"))
    x = make(N, V, d, r, dtype=torch.float32)
    x["ref_logps"] = near_ref_logps(x)  # as the test's ``ref_near``
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(N, generator=g) for _ in range(3)]
    kw = dict(temperature=1.0, kl_estimator="k3", with_entropy=True)

    def cast(dt):
        return {k: (v.detach().to(dt).requires_grad_(v.requires_grad) if torch.is_tensor(v)
                    and v.is_floating_point() else v) for k, v in x.items()}

    _, g64 = grads_of(fp64_logprobs, cast(torch.float64), *[t.double() for t in w], **kw)
    _, g32 = grads_of(naive_logprobs, cast(torch.float32), *w, **kw)
    _, gch = grads_of(lambda **a: fused_logprobs(**a, impl="reference"), cast(torch.float32), *w, **kw)
    print(f"{N} x {V} x {d}, LoRA r{r}: max |fp32 - fp64| / max |fp64|\n")
    print("| gradient | max abs (fp64) | full logits | chunked (CPU path) |\n|---|---|---|---|")
    for k in g64:
        s = g64[k].abs().max().item()
        e = [(t[k].double() - g64[k]).abs().max().item() / s for t in (g32, gch)]
        print(f"| {k} | {s:.3g} | {e[0]:.2g} | {e[1]:.2g} |")


if __name__ == "__main__":
    main()
