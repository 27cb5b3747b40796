"""Per-token full-vocabulary KL(reference || policy) from two hidden-state tensors and one lm_head, without
materializing [N x V] logits. This file is the specification of the op and its CPU path.

For policy hidden states ``H (N, d)``, reference hidden states ``G (N, d)`` (the same base with adapters off,
or another adapter), the shared lm_head ``W (V, d)`` (bias ``b``), optional LoRA on the head for each side
(``A, B, s`` for the policy; ``A', B', s'`` for the reference), targets ``y (N,)`` and temperature ``T``:

    x    = H W^T + b + s (H A^T) B^T        q_x = G W^T + b + s' (G A'^T) B'^T          # (N, V), never whole
    z    = x / T   (c tanh(x / c) / T with softcapping c)        q = likewise from q_x
    P    = softmax(z)  (policy)                                  Q = softmax(q)  (reference)
    kl   = sum_j Q_j (log Q_j - log P_j) = sum_j Q_j (q_j - z_j) - lse(q) + lse(z)                  # (N,)
    logp = z[y] - lse(z),    ref_logp = q[y] - lse(q)                                               # (N,)

Streaming over the vocabulary (the Triton kernel), the online form keeps per token the running maxima
``m_z, m_q``, the normalizers ``s_z = sum e^(z - m_z)``, ``s_q = sum e^(q - m_q)`` and the reference-weighted
difference ``t = sum e^(q - m_q) (q - z)``, rescaled by ``e^(m_old - m_new)`` when a maximum moves; at the end
``kl = t / s_q - (m_q + log s_q) + (m_z + log s_z)``.

Backward (gradients reach the policy side only; the reference is a constant), with upstream ``g_kl, g_lp``:

    dz_j = g_kl (P_j - Q_j) + g_lp (1[j = y] - P_j)
    dX   = dz / T  (x 1 - tanh^2(x / c) with softcapping), then dH, dW, db, dA, dB as in the log-prob op.

This CPU path chunks over tokens (each chunk holds its full vocabulary rows of z and q, a bounded buffer)
and recomputes both chunks' logits in backward; forward keeps only the two log-sum-exps per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lowalign.kernels.logprobs.reference import (
    _CHUNK_ELEMENTS,
    _MIN_CHUNK,
    HeadGrads,
    _chunk_logits,
    naive_log_softmax,
)


@dataclass
class KLOutput:
    kl: torch.Tensor  # (N,) float32: KL(reference || policy) at each position, over the whole vocabulary
    logps: torch.Tensor  # (N,) float32: policy log-prob of the target token
    ref_logps: torch.Tensor  # (N,) float32: reference log-prob of the target token (no gradient)


def naive_kl(hidden, ref_hidden, weight, targets, *, bias=None, lora_a=None, lora_b=None, lora_scale=1.0,
             ref_lora_a=None, ref_lora_b=None, ref_lora_scale=1.0, temperature=1.0, softcap=None) -> KLOutput:
    """Full-logits implementation with ``torch.nn.functional.kl_div`` (materializes N x V twice): the
    independent check for tests and benchmarks."""
    logp = naive_log_softmax(hidden, weight, bias, lora_a, lora_b, lora_scale, temperature, softcap)
    with torch.no_grad():
        logq = naive_log_softmax(ref_hidden, weight, bias, ref_lora_a, ref_lora_b, ref_lora_scale, temperature,
                                 softcap)
    # kl_div(input=log P, target=log Q, log_target) = sum Q (log Q - log P)
    kl = torch.nn.functional.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)
    y = targets[:, None].long()
    return KLOutput(kl, logp.gather(-1, y).squeeze(-1), logq.gather(-1, y).squeeze(-1))


class ChunkedKL(torch.autograd.Function):
    """autograd.Function: forward saves the inputs (by reference) and the two log-sum-exps per token."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_a, lora_b, ref_hidden, ref_lora_a, ref_lora_b, targets, lora_scale,
                ref_lora_scale, temperature, softcap, chunk):
        N = hidden.shape[0]
        f32 = dict(device=hidden.device, dtype=torch.float32)
        lse_z, lse_q = torch.empty(N, **f32), torch.empty(N, **f32)
        kl, logp, ref_logp = torch.empty(N, **f32), torch.empty(N, **f32), torch.empty(N, **f32)
        with torch.no_grad():
            for s in range(0, N, chunk):
                e = min(N, s + chunk)
                y = targets[s:e, None].long()
                z, _ = _chunk_logits(hidden[s:e], weight, bias, lora_a, lora_b, lora_scale, temperature, softcap)
                q, _ = _chunk_logits(ref_hidden[s:e], weight, bias, ref_lora_a, ref_lora_b, ref_lora_scale,
                                     temperature, softcap)
                lse_z[s:e], lse_q[s:e] = torch.logsumexp(z, -1), torch.logsumexp(q, -1)
                logp_all = z.sub_(lse_z[s:e, None])  # in place: two (c, V) buffers and one temporary
                logq_all = q.sub_(lse_q[s:e, None])
                logp[s:e] = logp_all.gather(-1, y).squeeze(-1)
                ref_logp[s:e] = logq_all.gather(-1, y).squeeze(-1)
                kl[s:e] = (logq_all - logp_all).mul_(logq_all.exp_()).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, lora_a, lora_b, ref_hidden, ref_lora_a, ref_lora_b, targets,
                              lse_z, lse_q)
        ctx.cfg = (lora_scale, ref_lora_scale, temperature, softcap, chunk)
        ctx.mark_non_differentiable(ref_logp)
        return kl, logp, ref_logp

    @staticmethod
    def backward(ctx, g_kl, g_lp, _g_ref):
        hidden, weight, bias, lora_a, lora_b, ref_hidden, ref_a, ref_b, targets, lse_z, lse_q = ctx.saved_tensors
        scale, ref_scale, temperature, softcap, chunk = ctx.cfg
        N = hidden.shape[0]
        zeros = torch.zeros_like(lse_z)
        g_kl = zeros if g_kl is None else g_kl.float()
        g_lp = zeros if g_lp is None else g_lp.float()
        grads = HeadGrads(hidden, weight, bias, lora_a, lora_b, scale, ctx.needs_input_grad[:5])
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z, u = _chunk_logits(hidden[s:e], weight, bias, lora_a, lora_b, scale, temperature, softcap)
            with torch.no_grad():
                q, _ = _chunk_logits(ref_hidden[s:e], weight, bias, ref_a, ref_b, ref_scale, temperature, softcap)
            dcap = None if not softcap else 1.0 - (z * (temperature / softcap)) ** 2
            p = z.sub_(lse_z[s:e, None]).exp_()  # P, in z's buffer
            r = q.sub_(lse_q[s:e, None]).exp_()  # Q, in q's buffer
            # dz = g_kl (P - Q) + g_lp (1[y] - P) = (g_kl - g_lp) P - g_kl Q + g_lp 1[y]
            dz = p.mul_((g_kl - g_lp)[s:e, None]).sub_(r.mul_(g_kl[s:e, None]))
            dz.scatter_add_(-1, targets[s:e, None].long(), g_lp[s:e, None])
            grads.add(dz, s, e, u, temperature, dcap)
        return (*grads.result(), None, None, None, None, None, None, None, None, None)


def default_chunk_size(vocab: int) -> int:
    """Tokens per chunk: two (c, V) fp32 buffers (policy and reference) in the budget of one log-prob chunk."""
    return max(_MIN_CHUNK, min(4096, _CHUNK_ELEMENTS // (2 * max(1, vocab))))


def check_kl_args(hidden, ref_hidden, lora_a, lora_b, ref_lora_a, ref_lora_b) -> None:
    if hidden.shape != ref_hidden.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and ref_hidden {tuple(ref_hidden.shape)} must match")
    if (lora_a is None) != (lora_b is None) or (ref_lora_a is None) != (ref_lora_b is None):
        raise ValueError("give both LoRA factors of a side (lora_a and lora_b, ref_lora_a and ref_lora_b), or neither")


def chunked_kl(hidden, ref_hidden, weight, targets, *, bias=None, lora_a=None, lora_b=None, lora_scale=1.0,
               ref_lora_a=None, ref_lora_b=None, ref_lora_scale=1.0, temperature=1.0, softcap=None,
               chunk_size=None) -> KLOutput:
    """Chunked reference / CPU path. Shapes: hidden, ref_hidden (N, d); weight (V, d); targets (N,)."""
    check_kl_args(hidden, ref_hidden, lora_a, lora_b, ref_lora_a, ref_lora_b)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    detach = lambda t: None if t is None else t.detach()
    kl, logp, ref_logp = ChunkedKL.apply(hidden, weight, bias, lora_a, lora_b, ref_hidden.detach(), detach(ref_lora_a),
                                         detach(ref_lora_b), targets, float(lora_scale), float(ref_lora_scale),
                                         float(temperature), float(softcap) if softcap else None, chunk)
    return KLOutput(kl, logp, ref_logp)
