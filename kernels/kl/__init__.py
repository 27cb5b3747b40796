"""Fused per-token full-vocabulary KL(reference || policy) (+ both sides' target log-probs) from two
hidden-state tensors and the lm_head, never storing [N x V] logits.

:func:`fused_kl` dispatches like :func:`lowalign.kernels.logprobs.fused_logprobs`: Triton on CUDA for
forward-only calls, the chunked PyTorch reference when a gradient will flow (on an H200, fwd+bwd 237 vs 85
ms at 4096 x 128256 x 4096, 122 vs 129 ms at 8192 x 151936 x 1536) and everywhere off CUDA; ``impl=`` or
``LOWALIGN_LOGPROB_IMPL`` overrides (``naive`` is the full-logits ``kl_div`` check).
"""

from __future__ import annotations

from lowalign.kernels.kl.reference import KLOutput, chunked_kl, naive_kl
from lowalign.kernels.logprobs import needs_grad, resolve_impl

__all__ = ["KLOutput", "chunked_kl", "fused_kl", "naive_kl"]


def fused_kl(hidden, ref_hidden, weight, targets, *, bias=None, lora_a=None, lora_b=None, lora_scale=1.0,
             ref_lora_a=None, ref_lora_b=None, ref_lora_scale=1.0, temperature=1.0, softcap=None,
             impl: str | None = None) -> KLOutput:
    """Per-token ``KL(softmax(q) || softmax(z))`` over the whole vocabulary, with z the policy's logits
    (from ``hidden`` and the head, with the policy's LoRA on it if any) and q the reference's (from
    ``ref_hidden``, ``ref_lora_*``), both through ``softcap`` and ``temperature``; plus the target tokens'
    log-probs under each. Gradients reach the policy side only.

    Shapes: hidden, ref_hidden (N, d); weight (V, d); targets (N,); bias (V,); lora_a (r, d); lora_b (V, r).
    Returns KLOutput(kl, logps, ref_logps), each (N,) float32.
    """
    kw = dict(bias=bias, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, ref_lora_a=ref_lora_a,
              ref_lora_b=ref_lora_b, ref_lora_scale=ref_lora_scale, temperature=temperature, softcap=softcap)
    which = resolve_impl(impl, hidden.device.type, needs_grad(hidden, weight, bias, lora_a, lora_b))
    if which == "triton":
        from lowalign.kernels.kl.triton import triton_kl

        return triton_kl(hidden, ref_hidden, weight, targets, **kw)
    if which == "naive":
        return naive_kl(hidden, ref_hidden, weight, targets, **kw)
    return chunked_kl(hidden, ref_hidden, weight, targets, **kw)
