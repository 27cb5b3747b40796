"""Per-token log-probs of chosen tokens from hidden states, without materializing [N x V] logits.

This file is the specification of the op and its CPU path. For hidden states ``H (N, d)``, the lm_head
weight ``W (V, d)`` (optional bias ``b (V,)``, optional LoRA factors ``A (r, d)``, ``B (V, r)``, scale
``s``), targets ``y (N,)`` and temperature ``T``:

    x      = H W^T + b + s (H A^T) B^T                             # (N, V), never stored whole
    z      = x / T          or, with final-logit softcapping c (Gemma-2):  z = c tanh(x / c) / T
    lse    = logsumexp(z, -1)                                      # (N,)
    logp   = z[y] - lse                                            # (N,)
    ent    = lse - sum_j p_j z_j,      p = softmax(z)              # (N,) entropy
    kl     = k1: logp - ref | k2: (logp - ref)^2 / 2 | k3: exp(ref - logp) - (ref - logp) - 1

Backward, with upstream gradients ``g_lp, g_ent, g_kl`` (N,):

    g      = g_lp + g_kl * dkl/dlogp          # k1: 1, k2: logp - ref, k3: 1 - exp(ref - logp)
    dz_j   = g (1[j = y] - p_j) - g_ent p_j (log p_j + ent)
    dX     = dz / T                               (X = pre-temperature logits)
    dX    *= 1 - tanh^2(x / c) = 1 - (z T / c)^2  with softcapping (recomputed from z: no extra state)
    dH     = dX W + s (dX B) A ;  dW = dX^T H ;  db = sum_n dX ;  dB = s dX^T (H A^T) ;  dA = s (dX B)^T H

Tokens are processed in chunks: forward keeps only ``lse`` (plus the outputs); backward recomputes each
chunk's logits. Weight-side gradients are only computed (and their ``V x d`` buffers only allocated)
when the corresponding input requires grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
_CHUNK_ELEMENTS = 1 << 23  # logits elements per chunk (32 MiB in fp32) ...
_MIN_CHUNK = 128  # ... but never fewer tokens than this: tiny chunks starve the matmuls at large V


@dataclass
class LogProbOutput:
    logps: torch.Tensor  # (N,) float32
    entropy: torch.Tensor | None = None  # (N,) float32, when requested
    kl: torch.Tensor | None = None  # (N,) float32, when ref_logps was given


def kl_from_logps(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from sampled-token log-probs (Schulman's k1/k2/k3)."""
    delta = ref_logps - logps
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta * delta
    if estimator == "k3":
        return torch.exp(delta) - delta - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def _dkl_dlogp(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    delta = ref_logps - logps
    if estimator == "k1":
        return torch.ones_like(logps)
    if estimator == "k2":
        return -delta
    return 1.0 - torch.exp(delta)  # k3


def naive_log_softmax(hidden, weight, bias, lora_a, lora_b, lora_scale, temperature, softcap) -> torch.Tensor:
    """log softmax of the full (N, V) fp32 logits, written out plainly (no chunking, no custom backward)."""
    logits = hidden.float() @ weight.float().T
    if bias is not None:
        logits = logits + bias.float()
    if lora_a is not None:
        logits = logits + lora_scale * (hidden.float() @ lora_a.float().T) @ lora_b.float().T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits / temperature, dim=-1)


def naive_logprobs(hidden, weight, targets, *, bias=None, lora_a=None, lora_b=None, lora_scale=1.0,
                   temperature=1.0, ref_logps=None, kl_estimator="k3", with_entropy=False,
                   softcap=None) -> LogProbOutput:
    """Full-logits implementation (materializes N x V). Independent check for tests and benchmarks."""
    logp_all = naive_log_softmax(hidden, weight, bias, lora_a, lora_b, lora_scale, temperature, softcap)
    logps = logp_all.gather(-1, targets[:, None].long()).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    kl = kl_from_logps(logps, ref_logps.float(), kl_estimator) if ref_logps is not None else None
    return LogProbOutput(logps, ent, kl)


def _chunk_logits(h, weight, bias, lora_a, lora_b, scale, temperature, softcap, out=None):
    """Logits of one chunk (fp32; softcapped, then tempered) and the LoRA projection (for backward). ``out``:
    an fp32 (>= c, V) buffer to write them into (used when the head is fp32), so a loop over chunks reuses one
    buffer instead of allocating [c, V] per chunk (:func:`_chunk_buffer` gives one only for an fp32 head)."""
    if out is not None:
        x = torch.mm(h, weight.T, out=out[:h.shape[0]])
    else:
        x = (h @ weight.T).float()  # (c, V); half inputs multiply in their dtype, accumulate fp32 after
    u = None
    if bias is not None:
        x += bias.float()
    if lora_a is not None:
        u = h @ lora_a.T  # (c, r)
        x += scale * (u @ lora_b.T).float()
    if softcap:
        x = x.div_(softcap).tanh_().mul_(softcap)
    return x.div_(temperature) if temperature != 1.0 else x, u


def _chunk_buffer(hidden, weight, chunk: int):
    """One fp32 (chunk, V) buffer for a pass over several chunks of an fp32 head (None otherwise, or when the
    tokens fit one chunk): allocating and freeing [c, V] per chunk grows a CPU process's heap."""
    if hidden.shape[0] <= chunk or not hidden.dtype == weight.dtype == torch.float32:
        return None
    return torch.empty(chunk, weight.shape[0], device=hidden.device, dtype=torch.float32)


class ChunkedLogProbs(torch.autograd.Function):
    """autograd.Function: forward saves H, W (by reference), targets and per-token lse/logp/entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_a, lora_b, targets, ref_logps, lora_scale, temperature,
                kl_estimator, chunk_size, with_entropy, softcap):
        N = hidden.shape[0]
        dev = hidden.device
        lse = torch.empty(N, device=dev, dtype=torch.float32)
        logps = torch.empty_like(lse)
        ent = torch.zeros_like(lse)
        buf = _chunk_buffer(hidden, weight, chunk_size)
        with torch.no_grad():
            for s in range(0, N, chunk_size):
                e = min(N, s + chunk_size)
                z, _ = _chunk_logits(hidden[s:e], weight, bias, lora_a, lora_b, lora_scale, temperature, softcap,
                                     out=buf)
                zy = z.gather(-1, targets[s:e, None].long()).squeeze(-1)
                if with_entropy:  # ent = lse - sum_j p_j z_j: two extra passes over the chunk, only on request
                    m = torch.logsumexp(z, dim=-1)  # (c,)
                    ent[s:e] = m - (torch.softmax(z, dim=-1) * z).sum(-1)
                else:  # logsumexp's own steps, in the chunk's buffer (torch.logsumexp holds two more [c, V])
                    mx = z.amax(-1, keepdim=True)
                    mx.masked_fill_(mx.isinf(), 0.0)
                    m = z.sub_(mx).exp_().sum(-1).log_().add_(mx.squeeze(-1))
                lse[s:e] = m
                logps[s:e] = zy - m
        kl = (kl_from_logps(logps, ref_logps.float(), kl_estimator) if ref_logps is not None
              else torch.zeros_like(logps))
        ctx.save_for_backward(hidden, weight, bias, lora_a, lora_b, targets, ref_logps, lse, logps, ent)
        ctx.cfg = (lora_scale, temperature, kl_estimator, chunk_size, softcap)
        ctx.with_entropy = with_entropy
        return logps, ent, kl

    @staticmethod
    def backward(ctx, g_lp, g_ent, g_kl):
        hidden, weight, bias, lora_a, lora_b, targets, ref_logps, lse, logps, ent = ctx.saved_tensors
        scale, temperature, estimator, chunk, softcap = ctx.cfg
        N = hidden.shape[0]
        g = torch.zeros_like(logps) if g_lp is None else g_lp.float()
        if g_kl is not None and ref_logps is not None:
            g = g + g_kl.float() * _dkl_dlogp(logps, ref_logps.float(), estimator)
        g_ent = None if g_ent is None or not ctx.with_entropy or not torch.any(g_ent != 0) else g_ent.float()

        grads = HeadGrads(hidden, weight, bias, lora_a, lora_b, scale, ctx.needs_input_grad[:5])
        buf = _chunk_buffer(hidden, weight, chunk)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z, u = _chunk_logits(hidden[s:e], weight, bias, lora_a, lora_b, scale, temperature, softcap, out=buf)
            # softcap derivative 1 - tanh^2(x/c) = 1 - (z T / c)^2, taken before z is overwritten
            dcap = None if not softcap else 1.0 - (z * (temperature / softcap)) ** 2
            logp_all = z.sub_(lse[s:e, None])  # in place: z is not needed any more
            if g_ent is not None:  # dz_ent = -g_ent p (log p + ent)
                p = logp_all.exp()
                dz = (logp_all + ent[s:e, None]).mul_(p).mul_(-g_ent[s:e, None])
                dz.sub_(p.mul_(g[s:e, None]))
            else:
                dz = logp_all.exp_().mul_(-g[s:e, None])  # -g p, reusing the chunk's buffer
            dz.scatter_add_(-1, targets[s:e, None].long(), g[s:e, None])  # + g at the target
            grads.add(dz, s, e, u, temperature, dcap)
        return (*grads.result(), None, None, None, None, None, None, None, None)


class HeadGrads:
    """Gradient buffers of the head's inputs, filled one token chunk at a time from dZ (the gradient of the
    tempered, softcapped logits): dX = dZ / T (* 1 - tanh^2 with softcapping), then

        dH = dX W + s (dX B) A ;  dW = dX^T H ;  db = sum_n dX ;  dB = s dX^T U ;  dA = s (dX B)^T H

    Only the inputs in ``needs`` (H, W, b, A, B) get buffers, so a frozen head costs no V x d memory."""

    def __init__(self, hidden, weight, bias, lora_a, lora_b, scale, needs):
        self.hidden, self.weight, self.bias, self.lora_a, self.lora_b, self.scale = (
            hidden, weight, bias, lora_a, lora_b, scale)
        need_h, need_w, need_b, need_a, need_bb = needs
        f32 = lambda t: torch.zeros(t.shape, device=hidden.device, dtype=torch.float32)
        self.dH = torch.empty_like(hidden) if need_h else None
        self.dW = f32(weight) if need_w else None
        self.db = f32(bias) if need_b else None
        self.dA = f32(lora_a) if need_a else None
        self.dB = f32(lora_b) if need_bb else None

    def add(self, dz, s, e, u, temperature, dcap):
        """Rows ``s:e``: dz (c, V) fp32 (modified in place), u = H A^T of the chunk (or None)."""
        h, weight, lora_a, lora_b, scale = self.hidden[s:e], self.weight, self.lora_a, self.lora_b, self.scale
        if temperature != 1.0:
            dz /= temperature
        if dcap is not None:
            dz *= dcap
        dzc = dz.to(weight.dtype)
        if self.dH is not None:
            dh = dzc @ weight
            if lora_a is not None:
                dh = dh + scale * ((dzc @ lora_b.to(dzc.dtype)) @ lora_a.to(dzc.dtype))
            self.dH[s:e] = dh.to(self.hidden.dtype)
        if self.dW is not None:
            self.dW.addmm_(dz.T, h.float())  # accumulate in place: no V x d temporary per chunk
        if self.db is not None:
            self.db += dz.sum(0)
        if self.dB is not None:
            self.dB += scale * (dz.T @ u.float())
        if self.dA is not None:
            self.dA += scale * ((dz @ lora_b.float()).T @ h.float())

    def result(self):
        """(dH, dW, db, dA, dB), each in its input's dtype, None where not needed."""
        cast = lambda t, ref: None if t is None else t.to(ref.dtype)
        return (self.dH, cast(self.dW, self.weight), cast(self.db, self.bias), cast(self.dA, self.lora_a),
                cast(self.dB, self.lora_b))


def default_chunk_size(vocab: int) -> int:
    return max(_MIN_CHUNK, min(4096, _CHUNK_ELEMENTS // max(1, vocab)))


def chunked_logprobs(hidden, weight, targets, *, bias=None, lora_a=None, lora_b=None, lora_scale=1.0,
                     temperature=1.0, ref_logps=None, kl_estimator="k3", with_entropy=False,
                     chunk_size=None, softcap=None) -> LogProbOutput:
    """Chunked reference / CPU path. Shapes: hidden (N, d), weight (V, d), targets (N,). ``softcap``: the
    model's final-logit softcapping c (Gemma-2), applied as c tanh(x / c) before the temperature."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("give both lora_a and lora_b, or neither")
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    ref = None if ref_logps is None else ref_logps.detach()
    logps, ent, kl = ChunkedLogProbs.apply(hidden, weight, bias, lora_a, lora_b, targets, ref,
                                           float(lora_scale), float(temperature), kl_estimator, chunk,
                                           bool(with_entropy), float(softcap) if softcap else None)
    return LogProbOutput(logps, ent if with_entropy else None, kl if ref_logps is not None else None)
