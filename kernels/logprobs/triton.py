"""Triton kernels for fused per-token log-probs (+ entropy, + KL), never storing [N x V] logits.

Layout: ``@triton.jit`` kernels -> host functions -> ``torch.autograd.Function``. The math is the one
specified in ``reference.py``; the derivation is repeated where it is used.

Forward (grid: token blocks). For each block of BLOCK_N tokens, walk the vocabulary in BLOCK_V tiles:

    x     = H W^T + U B^T + b                 one (BLOCK_N, BLOCK_V) tile at a time, tl.dot over d (and r)
    z     = x / T,  or c tanh(x / c) / T with final-logit softcapping c (Gemma-2)
    m'    = max(m, rowmax z);  a = exp(m - m')                     online log-sum-exp
    s     = s a + sum_j exp(z_j - m')                              -> lse = m + log s
    t     = t a + sum_j exp(z_j - m') z_j                          -> E_p[z] = t / s, entropy = lse - t / s
    z_y  += z[y] where the tile holds the target                   -> logp = z_y - lse
    kl    = k1 | k2 | k3 of (ref - logp), fused at the end

where ``U = s_lora H A^T`` (N, r) is precomputed on the host (an N x r matmul) so the LoRA term is just
one more inner loop over r.

Backward. With g = g_lp + g_kl dkl/dlogp (host, elementwise), and p_j = exp(z_j - lse):

    dz_j = g (1[j = y] - p_j) - g_ent p_j (z_j - lse + ent) ;  dx = dz / T
    softcapping: dx *= 1 - tanh^2(x / c) = 1 - (z T / c)^2, recomputed from the tile's z

* ``_bwd_dh_kernel`` (grid: token blocks) recomputes each logits tile and accumulates
  dH += dx W and dU += dx B into fp32 buffers owned by that program (no atomics, so deterministic).
  The host then adds dH += s dU A and forms dA = s dU^T H.
* ``_bwd_dw_kernel`` (grid: vocabulary blocks), launched only when W, b or B require grad, accumulates
  dW += dx^T H, db += sum_n dx, dB += dx^T U. A frozen lm_head costs no weight-gradient work and no
  V x d buffer.

Precision: fp32 accumulation everywhere. fp32 inputs use ``input_precision="ieee"`` (no TF32). Half
inputs feed tensor cores in their own dtype on a GPU; under ``TRITON_INTERPRET=1`` every load is upcast
to fp32 right away (the interpreter gets bf16 arithmetic wrong).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from lowalign.kernels.logprobs.reference import KL_ESTIMATORS, LogProbOutput, _dkl_dlogp

_KL_ID = {"k1": 1, "k2": 2, "k3": 3}


@triton.jit
def _logits_tile(h_ptr, w_ptr, u_ptr, b2_ptr, bias_ptr, offs_n, offs_v, N, V, D, R,
                 stride_h, stride_w, stride_u, stride_b2, inv_t, cap,
                 HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    # x[n, v] = sum_k H[n,k] W[v,k] + sum_k U[n,k] B[v,k] + b[v] (fp32 accumulation); z = x / T, or
    # c tanh(x / c) / T with softcapping
    n_ok = offs_n < N
    v_ok = offs_v < V
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs_k = k0 + tl.arange(0, BLOCK_D)
        k_ok = offs_k < D
        h = tl.load(h_ptr + offs_n[:, None] * stride_h + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_k[None, :], mask=v_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(h, tl.trans(w), input_precision=PREC)
    if HAS_LORA:
        for k0 in range(0, R, BLOCK_R):
            offs_k = k0 + tl.arange(0, BLOCK_R)
            k_ok = offs_k < R
            u = tl.load(u_ptr + offs_n[:, None] * stride_u + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b2 = tl.load(b2_ptr + offs_v[:, None] * stride_b2 + offs_k[None, :],
                         mask=v_ok[:, None] & k_ok[None, :], other=0.0)
            # the LoRA term is r/d of the work: always fp32 (U is kept in fp32 by the host)
            acc += tl.dot(u.to(tl.float32), tl.trans(b2.to(tl.float32)), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:  # tanh(a) = 1 - 2 / (exp(2a) + 1): exact limits +-1 when exp over/underflows
        acc = cap * (1.0 - 2.0 / (tl.exp(2.0 * acc / cap) + 1.0))
    return acc * inv_t


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, u_ptr, b2_ptr, bias_ptr, y_ptr, ref_ptr, lse_ptr, logp_ptr, ent_ptr, kl_ptr,
                N, V, D, R, stride_h, stride_w, stride_u, stride_b2, inv_t, cap,
                HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, HAS_REF: tl.constexpr,
                KL_EST: tl.constexpr,
                UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=n_ok, other=0)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) z
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)  # target logit
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, u_ptr, b2_ptr, bias_ptr, offs_n, offs_v, N, V, D, R,
                         stride_h, stride_w, stride_u, stride_b2, inv_t, cap, HAS_BIAS, HAS_LORA, SOFTCAP,
                         UPCAST, PREC, BLOCK_N, BLOCK_V, BLOCK_D, BLOCK_R)
        zs = tl.where(v_ok[None, :], z, 0.0)
        z = tl.where(v_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])  # 0 on padding columns
        s = s * alpha + tl.sum(p, axis=1)
        t = t * alpha + tl.sum(p * zs, axis=1)
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], zs, 0.0), axis=1)
        m = m_new
    lse = m + tl.log(s)
    logp = zy - lse
    tl.store(lse_ptr + offs_n, lse, mask=n_ok)
    tl.store(logp_ptr + offs_n, logp, mask=n_ok)
    tl.store(ent_ptr + offs_n, lse - t / s, mask=n_ok)
    if HAS_REF:
        d = tl.load(ref_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32) - logp  # ref - logp
        if KL_EST == 1:
            kl = -d
        elif KL_EST == 2:
            kl = 0.5 * d * d
        else:
            kl = tl.exp(d) - d - 1.0
        tl.store(kl_ptr + offs_n, kl, mask=n_ok)


@triton.jit
def _dlogits_tile(z, offs_v, y, lse, g, ent, gent, V, inv_t, cap, HAS_ENT: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    # dx_j = [g (1[j=y] - p_j) - g_ent p_j (z_j - lse + ent)] / T   (x 1 - (z_j T / c)^2 with softcapping)
    v_ok = offs_v < V
    logp_all = z - lse[:, None]
    p = tl.where(v_ok[None, :], tl.exp(logp_all), 0.0)
    dz = tl.where(offs_v[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
    if HAS_ENT:
        dz -= gent[:, None] * p * (logp_all + ent[:, None])
    if SOFTCAP:
        th = z / (cap * inv_t)  # tanh(x / c)
        dz = dz * (1.0 - th * th)
    return dz * inv_t


@triton.jit
def _acc_rows(dx, m_ptr, stride_m, offs_v, v_ok, out_ptr, offs_n, n_ok, K,
              UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[n, :] += dx M[v, :]   (out is (N, K) fp32 and its rows offs_n belong to this program: no atomics)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        m = tl.load(m_ptr + offs_v[:, None] * stride_m + offs_k[None, :], mask=v_ok[:, None] & k_ok[None, :],
                    other=0.0)
        m = m.to(tl.float32) if UPCAST else m
        ptrs = out_ptr + offs_n[:, None] * K + offs_k[None, :]
        msk = n_ok[:, None] & k_ok[None, :]
        acc = tl.load(ptrs, mask=msk, other=0.0)
        acc += tl.dot(dx.to(m.dtype), m, input_precision=PREC)
        tl.store(ptrs, acc, mask=msk)


@triton.jit
def _acc_cols(dx, m_ptr, stride_m, offs_n, n_ok, out_ptr, offs_v, v_ok, K,
              UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[v, :] += dx^T M[n, :]   (out is (V, K) fp32 and its rows offs_v belong to this program)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        m = tl.load(m_ptr + offs_n[:, None] * stride_m + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        m = m.to(tl.float32) if UPCAST else m
        ptrs = out_ptr + offs_v[:, None] * K + offs_k[None, :]
        msk = v_ok[:, None] & k_ok[None, :]
        acc = tl.load(ptrs, mask=msk, other=0.0)
        acc += tl.dot(tl.trans(dx.to(m.dtype)), m, input_precision=PREC)
        tl.store(ptrs, acc, mask=msk)


@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, u_ptr, b2_ptr, bias_ptr, y_ptr, lse_ptr, g_ptr, ent_ptr, gent_ptr, dh_ptr, du_ptr,
                   N, V, D, R, stride_h, stride_w, stride_u, stride_b2, inv_t, cap,
                   HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr,
                   NEED_DH: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=n_ok, other=0)
    lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)
    ent = tl.load(ent_ptr + offs_n, mask=n_ok, other=0.0)
    gent = tl.load(gent_ptr + offs_n, mask=n_ok, other=0.0) if HAS_ENT else g
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, u_ptr, b2_ptr, bias_ptr, offs_n, offs_v, N, V, D, R,
                         stride_h, stride_w, stride_u, stride_b2, inv_t, cap, HAS_BIAS, HAS_LORA, SOFTCAP,
                         UPCAST, PREC, BLOCK_N, BLOCK_V, BLOCK_D, BLOCK_R)
        dx = _dlogits_tile(z, offs_v, y, lse, g, ent, gent, V, inv_t, cap, HAS_ENT, SOFTCAP)
        if NEED_DH:  # dH[n, :] += dx W[v, :]
            _acc_rows(dx, w_ptr, stride_w, offs_v, v_ok, dh_ptr, offs_n, n_ok, D, UPCAST, PREC, BLOCK_D)
        if HAS_LORA:  # dU[n, :] += dx B[v, :]   (the LoRA term: always fp32)
            _acc_rows(dx, b2_ptr, stride_b2, offs_v, v_ok, du_ptr, offs_n, n_ok, R, True, "ieee", BLOCK_R)


@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, u_ptr, b2_ptr, bias_ptr, y_ptr, lse_ptr, g_ptr, ent_ptr, gent_ptr,
                   dw_ptr, db_ptr, db2_ptr, N, V, D, R, stride_h, stride_w, stride_u, stride_b2, inv_t, cap,
                   HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr,
                   NEED_W: tl.constexpr, NEED_BIAS: tl.constexpr, NEED_B2: tl.constexpr,
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
        lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=0.0)
        g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)  # 0 on padding rows -> dx = 0 there
        ent = tl.load(ent_ptr + offs_n, mask=n_ok, other=0.0)
        gent = tl.load(gent_ptr + offs_n, mask=n_ok, other=0.0) if HAS_ENT else g
        z = _logits_tile(h_ptr, w_ptr, u_ptr, b2_ptr, bias_ptr, offs_n, offs_v, N, V, D, R,
                         stride_h, stride_w, stride_u, stride_b2, inv_t, cap, HAS_BIAS, HAS_LORA, SOFTCAP,
                         UPCAST, PREC, BLOCK_N, BLOCK_V, BLOCK_D, BLOCK_R)
        dx = _dlogits_tile(z, offs_v, y, lse, g, ent, gent, V, inv_t, cap, HAS_ENT, SOFTCAP)
        if NEED_BIAS:
            dbias += tl.sum(dx, axis=0)
        if NEED_W:  # dW[v, :] += dx^T H[n, :]
            _acc_cols(dx, h_ptr, stride_h, offs_n, n_ok, dw_ptr, offs_v, v_ok, D, UPCAST, PREC, BLOCK_D)
        if NEED_B2:  # dB[v, :] += dx^T U[n, :]
            _acc_cols(dx, u_ptr, stride_u, offs_n, n_ok, db2_ptr, offs_v, v_ok, R, True, "ieee", BLOCK_R)
    if NEED_BIAS:
        tl.store(db_ptr + offs_v, dbias, mask=v_ok)


# ---- host side -----------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(D: int, R: int, kind: str = "fwd") -> dict:
    """Static tile sizes and launch shape (multi-config autotune does not run under the interpreter).
    ``LOWALIGN_TRITON_BLOCKS`` / ``LOWALIGN_TRITON_BLOCKS_BWD`` = "BLOCK_N,BLOCK_V,BLOCK_D,num_warps,num_stages"
    override them (used by ``benchmarks/bench_logprobs.py --sweep`` to tune a GPU)."""
    if _interpreting():
        bn, bv, bd, warps, stages = 16, 32, 16, 4, 2
    else:
        bn, bv, bd, warps, stages = 64, 128, 64, 4, 3
    env = os.environ.get("LOWALIGN_TRITON_BLOCKS" + ("_BWD" if kind == "bwd" else ""))
    if env:
        bn, bv, bd, warps, stages = (int(x) for x in env.split(","))
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=min(bd, max(16, triton.next_power_of_2(D))),
                BLOCK_R=max(16, triton.next_power_of_2(max(R, 1))), num_warps=warps, num_stages=stages)


def _flags(hidden: torch.Tensor) -> dict:
    upcast = _interpreting() or hidden.dtype == torch.float32
    return dict(UPCAST=upcast, PREC="ieee" if upcast else "tf32")


def _common(hidden, weight, u, lora_b, bias):
    N, D = hidden.shape
    V = weight.shape[0]
    R = u.shape[1] if u is not None else 0
    dummy = hidden  # any valid pointer for absent optional inputs (never read: constexpr-guarded)
    args = (hidden, weight, dummy if u is None else u, dummy if lora_b is None else lora_b,
            dummy if bias is None else bias)
    strides = (hidden.stride(0), weight.stride(0), u.stride(0) if u is not None else 0,
               lora_b.stride(0) if lora_b is not None else 0)
    return N, V, D, R, args, strides


def head_grads(needs, hidden, weight, bias, lora_a, lora_b, u, scale, launch_dh, launch_dw):
    """The backward kernels' host side: allocate the fp32 buffers of the gradients ``needs`` asks for (H, W, b,
    A, B), launch ``launch_dh(dh, du, need_dh)`` (token blocks: dH += dx W, dU += dx B) and
    ``launch_dw(dw, db, dB, (need_w, need_b, need_B))`` (vocabulary blocks, only when the head trains), then
    finish the LoRA terms: dH += s dU A, dA = s dU^T H. Returns (dH, dW, db, dA, dB) in the inputs' dtypes."""
    need_h, need_w, need_b, need_a, need_bb = needs
    N, D = hidden.shape
    V, R = weight.shape[0], (u.shape[1] if u is not None else 0)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    dH = dA = dW = db = dB = None
    if need_h or need_a:
        dh = torch.zeros(N, D, **f32) if need_h else torch.zeros(1, **f32)
        du = torch.zeros(N, max(R, 1), **f32)
        launch_dh(dh, du, need_h)
        if u is not None:
            du = du[:, :R]
            if need_h:
                dh += scale * (du @ lora_a.float())
            if need_a:
                dA = (scale * (du.T @ hidden.float())).to(lora_a.dtype)
        dH = dh.to(hidden.dtype) if need_h else None
    if need_w or need_b or need_bb:
        dw = torch.zeros(V, D, **f32) if need_w else torch.zeros(1, **f32)
        dbias = torch.zeros(V, **f32) if need_b else torch.zeros(1, **f32)
        db2 = torch.zeros(V, max(R, 1), **f32) if need_bb else torch.zeros(1, **f32)
        launch_dw(dw, dbias, db2, (need_w, need_b, need_bb))
        dW = dw.to(weight.dtype) if need_w else None
        db = dbias.to(bias.dtype) if need_b else None
        dB = db2[:, :R].to(lora_b.dtype) if need_bb else None
    return dH, dW, db, dA, dB


class TritonLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_a, lora_b, targets, ref_logps, lora_scale, temperature,
                kl_estimator, softcap):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        lora_b = lora_b.contiguous() if lora_b is not None else None
        # U = s H A^T, (N, r) in fp32: tiny, and keeps the LoRA term exact for half inputs
        u = (lora_scale * (hidden.float() @ lora_a.float().T)).contiguous() if lora_a is not None else None
        N, V, D, R, args, strides = _common(hidden, weight, u, lora_b, bias)
        f32 = dict(device=hidden.device, dtype=torch.float32)
        lse, logp, ent = torch.empty(N, **f32), torch.empty(N, **f32), torch.empty(N, **f32)
        kl = torch.zeros(N, **f32)
        ref = ref_logps.contiguous() if ref_logps is not None else logp
        tgt = targets.contiguous()
        bl = _blocks(D, R)
        _fwd_kernel[(triton.cdiv(N, bl["BLOCK_N"]),)](
            *args, tgt, ref, lse, logp, ent, kl, N, V, D, R, *strides, 1.0 / temperature, softcap or 1.0,
            HAS_BIAS=bias is not None, HAS_LORA=u is not None, SOFTCAP=softcap is not None,
            HAS_REF=ref_logps is not None,
            KL_EST=_KL_ID[kl_estimator], **_flags(hidden), **bl)
        ctx.save_for_backward(hidden, weight, bias, lora_a, lora_b, u, tgt, ref_logps, lse, logp, ent)
        ctx.cfg = (lora_scale, temperature, kl_estimator, softcap)
        return logp, ent, kl

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_kl):
        hidden, weight, bias, lora_a, lora_b, u, tgt, ref_logps, lse, logp, ent = ctx.saved_tensors
        scale, temperature, estimator, softcap = ctx.cfg
        g = torch.zeros_like(logp) if g_lp is None else g_lp.float().contiguous()
        if g_kl is not None and ref_logps is not None:
            g = (g + g_kl.float() * _dkl_dlogp(logp, ref_logps.float(), estimator)).contiguous()
        has_ent = g_ent is not None and bool(torch.any(g_ent != 0))
        gent = g_ent.float().contiguous() if has_ent else g
        N, V, D, R, args, strides = _common(hidden, weight, u, lora_b, bias)
        bl, fl = _blocks(D, R, "bwd"), _flags(hidden)
        common = dict(HAS_BIAS=bias is not None, HAS_LORA=u is not None, SOFTCAP=softcap is not None,
                      HAS_ENT=has_ent, **fl, **bl)
        tail = (N, V, D, R, *strides, 1.0 / temperature, softcap or 1.0)

        def launch_dh(dh, du, need_dh):
            _bwd_dh_kernel[(triton.cdiv(N, bl["BLOCK_N"]),)](*args, tgt, lse, g, ent, gent, dh, du, *tail,
                                                              NEED_DH=need_dh, **common)

        def launch_dw(dw, dbias, db2, need):
            _bwd_dw_kernel[(triton.cdiv(V, bl["BLOCK_V"]),)](*args, tgt, lse, g, ent, gent, dw, dbias, db2, *tail,
                                                              NEED_W=need[0], NEED_BIAS=need[1], NEED_B2=need[2],
                                                              **common)

        dH, dW, db, dA, dB = head_grads(ctx.needs_input_grad[:5], hidden, weight, bias, lora_a, lora_b, u, scale,
                                        launch_dh, launch_dw)
        return dH, dW, db, dA, dB, None, None, None, None, None, None


def triton_logprobs(hidden, weight, targets, *, bias=None, lora_a=None, lora_b=None, lora_scale=1.0,
                    temperature=1.0, ref_logps=None, kl_estimator="k3", with_entropy=False,
                    softcap=None) -> LogProbOutput:
    """Triton path; same contract as :func:`reference.chunked_logprobs`."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("give both lora_a and lora_b, or neither")
    if not (hidden.is_cuda or _interpreting()):
        raise RuntimeError("the Triton log-prob kernel needs a CUDA tensor (or TRITON_INTERPRET=1)")
    ref = None if ref_logps is None else ref_logps.detach().float()
    logp, ent, kl = TritonLogProbs.apply(hidden, weight, bias, lora_a, lora_b, targets, ref, float(lora_scale),
                                         float(temperature), kl_estimator, float(softcap) if softcap else None)
    return LogProbOutput(logp, ent if with_entropy else None, kl if ref_logps is not None else None)
