"""Fused per-token log-probs (+ entropy, + KL to a reference) from hidden states and the lm_head.

The one entry point every algorithm uses is :func:`fused_logprobs`. On CUDA it runs the Triton kernel when
no gradient will flow (scoring, reference and old-policy log-probs) and the chunked PyTorch reference when
one will: measured on an H100, the Triton forward is 2x the chunked one at 8192 x 151936 x 1536, but its
backward is slower (fwd+bwd 96 vs 74 ms there, 218 vs 108 ms at d = 4096; benchmarks/RESULTS.md). Off CUDA
it is always the chunked reference. Override with ``impl=`` or the environment variable
``LOWALIGN_LOGPROB_IMPL`` (``reference`` | ``triton`` | ``naive``; ``naive`` materializes full logits and
exists for debugging and benchmarks only).
"""

from __future__ import annotations

import os

import torch
from lowalign.kernels.logprobs.reference import (
    KL_ESTIMATORS,
    LogProbOutput,
    chunked_logprobs,
    kl_from_logps,
    naive_logprobs,
)

__all__ = ["KL_ESTIMATORS", "LogProbOutput", "fused_logprobs", "kl_from_logps", "naive_logprobs",
           "chunked_logprobs", "needs_grad", "resolve_impl"]

IMPLS = ("auto", "reference", "triton", "naive")


def resolve_impl(impl: str | None, device_type: str, needs_grad: bool = False) -> str:
    """``auto``: Triton on CUDA for forward-only calls, the chunked reference for everything else."""
    impl = impl or os.environ.get("LOWALIGN_LOGPROB_IMPL") or "auto"
    if impl not in IMPLS:
        raise ValueError(f"log-prob impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        return "triton" if (device_type == "cuda" and not interpret and not needs_grad) else "reference"
    return impl


def needs_grad(*tensors) -> bool:
    """Whether autograd will record an op on ``tensors`` (any of them requires grad, grad mode on)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fused_logprobs(hidden, weight, targets, *, bias=None, lora_a=None, lora_b=None, lora_scale=1.0,
                   temperature=1.0, ref_logps=None, kl_estimator="k3", with_entropy=False, softcap=None,
                   impl: str | None = None) -> LogProbOutput:
    """Per-token ``log softmax(H W^T / T)[y]`` without storing [N x V] logits.

    Args:
        hidden: (N, d) backbone output. weight: (V, d) lm_head weight. targets: (N,) token ids.
        bias: optional (V,). lora_a (r, d), lora_b (V, r), lora_scale: optional LoRA on the lm_head.
        temperature: divides the logits (use the sampling temperature).
        ref_logps: optional (N,) reference log-probs; then ``kl`` holds the per-token estimate.
        kl_estimator: ``k1`` | ``k2`` | ``k3``.
        with_entropy: also return the per-token entropy of the distribution.
        softcap: final-logit softcapping c (Gemma-2): logits c tanh(x / c), before the temperature.
        impl: ``auto`` | ``reference`` | ``triton`` | ``naive``.
    Returns:
        LogProbOutput(logps (N,), entropy (N,) | None, kl (N,) | None), all float32, differentiable.
    """
    kw = dict(bias=bias, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, temperature=temperature,
              ref_logps=ref_logps, kl_estimator=kl_estimator, with_entropy=with_entropy, softcap=softcap)
    which = resolve_impl(impl, hidden.device.type, needs_grad(hidden, weight, bias, lora_a, lora_b))
    if which == "triton":
        from lowalign.kernels.logprobs.triton import triton_logprobs

        return triton_logprobs(hidden, weight, targets, **kw)
    if which == "naive":
        return naive_logprobs(hidden, weight, targets, **kw)
    return chunked_logprobs(hidden, weight, targets, **kw)
