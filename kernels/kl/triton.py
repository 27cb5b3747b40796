"""Triton kernels for the fused full-vocabulary KL(reference || policy), never storing [N x V] logits.

Layout: ``@triton.jit`` kernels -> host functions -> ``torch.autograd.Function``. The math is specified in
``reference.py``; the tile helpers (logits of a tile, gradient accumulation) are the log-prob kernels'.

Forward (grid: token blocks). Each program walks the vocabulary in BLOCK_V tiles, computing the policy tile
``z`` (from H, the head and the policy's LoRA) and the reference tile ``q`` (from G, the same head and the
reference's LoRA), and keeps per token

    m_z' = max(m_z, rowmax z);  s_z = s_z e^(m_z - m_z') + sum_j e^(z_j - m_z')
    m_q' = max(m_q, rowmax q);  a = e^(m_q - m_q')
    s_q  = s_q a + sum_j e^(q_j - m_q')
    t    = t a + sum_j e^(q_j - m_q') (q_j - z_j)            reference-weighted difference
    z_y, q_y                                                   the target's logits

then ``lse_z = m_z + log s_z``, ``lse_q = m_q + log s_q``, ``kl = t / s_q - lse_q + lse_z``,
``logp = z_y - lse_z``, ``ref_logp = q_y - lse_q``.

Backward recomputes both tiles; with P_j = e^(z_j - lse_z), Q_j = e^(q_j - lse_q):

    dz_j = g_kl (P_j - Q_j) + g_lp (1[j = y] - P_j);   dx = dz / T  (x 1 - (z T / c)^2 with softcapping)

* ``_kl_bwd_dh_kernel`` (grid: token blocks): dH += dx W, dU += dx B (policy LoRA); the host adds
  dH += s dU A and forms dA = s dU^T H.
* ``_kl_bwd_dw_kernel`` (grid: vocabulary blocks), only when W, b or B require grad: dW += dx^T H,
  db += sum_n dx, dB += dx^T U. A frozen head costs no weight-gradient work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lowalign.kernels.kl.reference import KLOutput, check_kl_args
from lowalign.kernels.logprobs.triton import (
    _acc_cols,
    _acc_rows,
    _blocks,
    _flags,
    _interpreting,
    _logits_tile,
    head_grads,
)


@triton.jit
def _kl_tiles(h_ptr, g_ptr, w_ptr, u_ptr, b2_ptr, ru_ptr, rb2_ptr, bias_ptr, offs_n, offs_v, N, V, D, R, RR,
              stride_h, stride_w, stride_u, stride_b2, stride_ru, stride_rb2, inv_t, cap,
              HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_REF_LORA: tl.constexpr, SOFTCAP: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    # the policy tile z (H, policy LoRA) and the reference tile q (G, reference LoRA) over the same head
    z = _logits_tile(h_ptr, w_ptr, u_ptr, b2_ptr, bias_ptr, offs_n, offs_v, N, V, D, R, stride_h, stride_w,
                     stride_u, stride_b2, inv_t, cap, HAS_BIAS, HAS_LORA, SOFTCAP, UPCAST, PREC, BLOCK_N, BLOCK_V,
                     BLOCK_D, BLOCK_R)
    q = _logits_tile(g_ptr, w_ptr, ru_ptr, rb2_ptr, bias_ptr, offs_n, offs_v, N, V, D, RR, stride_h, stride_w,
                     stride_ru, stride_rb2, inv_t, cap, HAS_BIAS, HAS_REF_LORA, SOFTCAP, UPCAST, PREC, BLOCK_N,
                     BLOCK_V, BLOCK_D, BLOCK_R)
    return z, q


@triton.jit
def _kl_fwd_kernel(h_ptr, g_ptr, w_ptr, u_ptr, b2_ptr, ru_ptr, rb2_ptr, bias_ptr, y_ptr,
                   lse_z_ptr, lse_q_ptr, kl_ptr, logp_ptr, ref_logp_ptr,
                   N, V, D, R, RR, stride_h, stride_w, stride_u, stride_b2, stride_ru, stride_rb2, inv_t, cap,
                   HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_REF_LORA: tl.constexpr,
                   SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=n_ok, other=0)
    m_z = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m_q = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_q = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum e^(q - m_q) (q - z)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    qy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z, q = _kl_tiles(h_ptr, g_ptr, w_ptr, u_ptr, b2_ptr, ru_ptr, rb2_ptr, bias_ptr, offs_n, offs_v, N, V, D, R,
                         RR, stride_h, stride_w, stride_u, stride_b2, stride_ru, stride_rb2, inv_t, cap, HAS_BIAS,
                         HAS_LORA, HAS_REF_LORA, SOFTCAP, UPCAST, PREC, BLOCK_N, BLOCK_V, BLOCK_D, BLOCK_R)
        diff = tl.where(v_ok[None, :], q - z, 0.0)
        is_y = offs_v[None, :] == y[:, None]
        zy += tl.sum(tl.where(is_y, z, 0.0), axis=1)
        qy += tl.sum(tl.where(is_y, q, 0.0), axis=1)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        q = tl.where(v_ok[None, :], q, float("-inf"))
        mz_new = tl.maximum(m_z, tl.max(z, axis=1))
        s_z = s_z * tl.exp(m_z - mz_new) + tl.sum(tl.exp(z - mz_new[:, None]), axis=1)
        m_z = mz_new
        mq_new = tl.maximum(m_q, tl.max(q, axis=1))
        a = tl.exp(m_q - mq_new)
        eq = tl.exp(q - mq_new[:, None])  # 0 on padding columns
        s_q = s_q * a + tl.sum(eq, axis=1)
        t = t * a + tl.sum(eq * diff, axis=1)
        m_q = mq_new
    lse_z = m_z + tl.log(s_z)
    lse_q = m_q + tl.log(s_q)
    tl.store(lse_z_ptr + offs_n, lse_z, mask=n_ok)
    tl.store(lse_q_ptr + offs_n, lse_q, mask=n_ok)
    tl.store(kl_ptr + offs_n, t / s_q - lse_q + lse_z, mask=n_ok)
    tl.store(logp_ptr + offs_n, zy - lse_z, mask=n_ok)
    tl.store(ref_logp_ptr + offs_n, qy - lse_q, mask=n_ok)


@triton.jit
def _kl_dlogits(z, q, offs_v, y, lse_z, lse_q, gkl, glp, V, inv_t, cap, SOFTCAP: tl.constexpr):
    # dx_j = [g_kl (P_j - Q_j) + g_lp (1[j=y] - P_j)] / T   (x 1 - (z_j T / c)^2 with softcapping)
    v_ok = offs_v < V
    p = tl.where(v_ok[None, :], tl.exp(z - lse_z[:, None]), 0.0)
    r = tl.where(v_ok[None, :], tl.exp(q - lse_q[:, None]), 0.0)
    dz = gkl[:, None] * (p - r) - glp[:, None] * p
    dz += tl.where(offs_v[None, :] == y[:, None], glp[:, None], 0.0)
    if SOFTCAP:
        th = z / (cap * inv_t)  # tanh(x / c)
        dz = dz * (1.0 - th * th)
    return dz * inv_t


@triton.jit
def _kl_bwd_dh_kernel(h_ptr, g_ptr, w_ptr, u_ptr, b2_ptr, ru_ptr, rb2_ptr, bias_ptr, y_ptr, lse_z_ptr, lse_q_ptr,
                      gkl_ptr, glp_ptr, dh_ptr, du_ptr,
                      N, V, D, R, RR, stride_h, stride_w, stride_u, stride_b2, stride_ru, stride_rb2, inv_t, cap,
                      HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_REF_LORA: tl.constexpr,
                      SOFTCAP: tl.constexpr, NEED_DH: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=n_ok, other=0)
    lse_z = tl.load(lse_z_ptr + offs_n, mask=n_ok, other=0.0)
    lse_q = tl.load(lse_q_ptr + offs_n, mask=n_ok, other=0.0)
    gkl = tl.load(gkl_ptr + offs_n, mask=n_ok, other=0.0)
    glp = tl.load(glp_ptr + offs_n, mask=n_ok, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z, q = _kl_tiles(h_ptr, g_ptr, w_ptr, u_ptr, b2_ptr, ru_ptr, rb2_ptr, bias_ptr, offs_n, offs_v, N, V, D, R,
                         RR, stride_h, stride_w, stride_u, stride_b2, stride_ru, stride_rb2, inv_t, cap, HAS_BIAS,
                         HAS_LORA, HAS_REF_LORA, SOFTCAP, UPCAST, PREC, BLOCK_N, BLOCK_V, BLOCK_D, BLOCK_R)
        dx = _kl_dlogits(z, q, offs_v, y, lse_z, lse_q, gkl, glp, V, inv_t, cap, SOFTCAP)
        if NEED_DH:  # dH[n, :] += dx W[v, :]
            _acc_rows(dx, w_ptr, stride_w, offs_v, v_ok, dh_ptr, offs_n, n_ok, D, UPCAST, PREC, BLOCK_D)
        if HAS_LORA:  # dU[n, :] += dx B[v, :]
            _acc_rows(dx, b2_ptr, stride_b2, offs_v, v_ok, du_ptr, offs_n, n_ok, R, True, "ieee", BLOCK_R)


@triton.jit
def _kl_bwd_dw_kernel(h_ptr, g_ptr, w_ptr, u_ptr, b2_ptr, ru_ptr, rb2_ptr, bias_ptr, y_ptr, lse_z_ptr, lse_q_ptr,
                      gkl_ptr, glp_ptr, dw_ptr, db_ptr, db2_ptr,
                      N, V, D, R, RR, stride_h, stride_w, stride_u, stride_b2, stride_ru, stride_rb2, inv_t, cap,
                      HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_REF_LORA: tl.constexpr,
                      SOFTCAP: tl.constexpr, NEED_W: tl.constexpr, NEED_BIAS: tl.constexpr, NEED_B2: tl.constexpr,
                      UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs_v = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < V
    dbias = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        y = tl.load(y_ptr + offs_n, mask=n_ok, other=0)
        lse_z = tl.load(lse_z_ptr + offs_n, mask=n_ok, other=0.0)
        lse_q = tl.load(lse_q_ptr + offs_n, mask=n_ok, other=0.0)
        gkl = tl.load(gkl_ptr + offs_n, mask=n_ok, other=0.0)  # 0 on padding rows -> dx = 0 there
        glp = tl.load(glp_ptr + offs_n, mask=n_ok, other=0.0)
        z, q = _kl_tiles(h_ptr, g_ptr, w_ptr, u_ptr, b2_ptr, ru_ptr, rb2_ptr, bias_ptr, offs_n, offs_v, N, V, D, R,
                         RR, stride_h, stride_w, stride_u, stride_b2, stride_ru, stride_rb2, inv_t, cap, HAS_BIAS,
                         HAS_LORA, HAS_REF_LORA, SOFTCAP, UPCAST, PREC, BLOCK_N, BLOCK_V, BLOCK_D, BLOCK_R)
        dx = _kl_dlogits(z, q, offs_v, y, lse_z, lse_q, gkl, glp, V, inv_t, cap, SOFTCAP)
        if NEED_BIAS:
            dbias += tl.sum(dx, axis=0)
        if NEED_W:  # dW[v, :] += dx^T H[n, :]
            _acc_cols(dx, h_ptr, stride_h, offs_n, n_ok, dw_ptr, offs_v, v_ok, D, UPCAST, PREC, BLOCK_D)
        if NEED_B2:  # dB[v, :] += dx^T U[n, :]
            _acc_cols(dx, u_ptr, stride_u, offs_n, n_ok, db2_ptr, offs_v, v_ok, R, True, "ieee", BLOCK_R)
    if NEED_BIAS:
        tl.store(db_ptr + offs_v, dbias, mask=v_ok)


# ---- host side -----------------------------------------------------------------------------------


def _lora_u(hidden, a, scale):
    """U = s H A^T, (N, r) in fp32 (tiny; keeps the LoRA term exact for half inputs)."""
    return None if a is None else (scale * (hidden.float() @ a.float().T)).contiguous()


def _args(hidden, ref_hidden, weight, u, lora_b, ru, ref_b, bias):
    N, D = hidden.shape
    dummy = hidden  # a valid pointer for absent optional inputs (never read: constexpr-guarded)
    ptrs = (hidden, ref_hidden, weight, u if u is not None else dummy, lora_b if lora_b is not None else dummy,
            ru if ru is not None else dummy, ref_b if ref_b is not None else dummy, bias if bias is not None else dummy)
    dims = (N, weight.shape[0], D, u.shape[1] if u is not None else 0, ru.shape[1] if ru is not None else 0)
    strides = (hidden.stride(0), weight.stride(0), u.stride(0) if u is not None else 0,
               lora_b.stride(0) if lora_b is not None else 0, ru.stride(0) if ru is not None else 0,
               ref_b.stride(0) if ref_b is not None else 0)
    return ptrs, dims, strides


class TritonKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_a, lora_b, ref_hidden, ref_a, ref_b, targets, scale, ref_scale,
                temperature, softcap):
        hidden, ref_hidden, weight = hidden.contiguous(), ref_hidden.contiguous().to(hidden.dtype), weight.contiguous()
        lora_b = lora_b.contiguous() if lora_b is not None else None
        ref_b = ref_b.contiguous() if ref_b is not None else None
        u, ru = _lora_u(hidden, lora_a, scale), _lora_u(ref_hidden, ref_a, ref_scale)
        ptrs, dims, strides = _args(hidden, ref_hidden, weight, u, lora_b, ru, ref_b, bias)
        N = dims[0]
        f32 = dict(device=hidden.device, dtype=torch.float32)
        lse_z, lse_q, kl, logp, ref_logp = (torch.empty(N, **f32) for _ in range(5))
        tgt = targets.contiguous()
        bl = _blocks(dims[2], max(dims[3], dims[4]))
        flags = dict(HAS_BIAS=bias is not None, HAS_LORA=u is not None, HAS_REF_LORA=ru is not None,
                     SOFTCAP=softcap is not None, **_flags(hidden), **bl)
        _kl_fwd_kernel[(triton.cdiv(N, bl["BLOCK_N"]),)](
            *ptrs, tgt, lse_z, lse_q, kl, logp, ref_logp, *dims, *strides, 1.0 / temperature, softcap or 1.0,
            **flags)
        ctx.save_for_backward(hidden, weight, bias, lora_a, lora_b, ref_hidden, ref_b, u, ru, tgt, lse_z, lse_q)
        ctx.cfg = (scale, temperature, softcap, flags)
        ctx.mark_non_differentiable(ref_logp)
        return kl, logp, ref_logp

    @staticmethod
    def backward(ctx, g_kl, g_lp, _g_ref):
        hidden, weight, bias, lora_a, lora_b, ref_hidden, ref_b, u, ru, tgt, lse_z, lse_q = ctx.saved_tensors
        scale, temperature, softcap, flags = ctx.cfg
        zeros = torch.zeros_like(lse_z)
        gkl = zeros if g_kl is None else g_kl.float().contiguous()
        glp = zeros if g_lp is None else g_lp.float().contiguous()
        ptrs, dims, strides = _args(hidden, ref_hidden, weight, u, lora_b, ru, ref_b, bias)
        N, V = dims[:2]
        common = (*ptrs, tgt, lse_z, lse_q, gkl, glp)
        tail = (*dims, *strides, 1.0 / temperature, softcap or 1.0)

        def launch_dh(dh, du, need_dh):
            _kl_bwd_dh_kernel[(triton.cdiv(N, flags["BLOCK_N"]),)](*common, dh, du, *tail, NEED_DH=need_dh, **flags)

        def launch_dw(dw, dbias, db2, need):
            _kl_bwd_dw_kernel[(triton.cdiv(V, flags["BLOCK_V"]),)](
                *common, dw, dbias, db2, *tail, NEED_W=need[0], NEED_BIAS=need[1], NEED_B2=need[2], **flags)

        dH, dW, db, dA, dB = head_grads(ctx.needs_input_grad[:5], hidden, weight, bias, lora_a, lora_b, u, scale,
                                        launch_dh, launch_dw)
        return dH, dW, db, dA, dB, None, None, None, None, None, None, None, None


def triton_kl(hidden, ref_hidden, weight, targets, *, bias=None, lora_a=None, lora_b=None, lora_scale=1.0,
              ref_lora_a=None, ref_lora_b=None, ref_lora_scale=1.0, temperature=1.0, softcap=None) -> KLOutput:
    """Triton path; same contract as :func:`reference.chunked_kl`."""
    check_kl_args(hidden, ref_hidden, lora_a, lora_b, ref_lora_a, ref_lora_b)
    if not (hidden.is_cuda or _interpreting()):
        raise RuntimeError("the Triton KL kernel needs a CUDA tensor (or TRITON_INTERPRET=1)")
    detach = lambda t: None if t is None else t.detach()
    kl, logp, ref_logp = TritonKL.apply(hidden, weight, bias, lora_a, lora_b, ref_hidden.detach(), detach(ref_lora_a),
                                        detach(ref_lora_b), targets, float(lora_scale), float(ref_lora_scale),
                                        float(temperature), float(softcap) if softcap else None)
    return KLOutput(kl, logp, ref_logp)
