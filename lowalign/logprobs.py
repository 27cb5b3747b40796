"""Model-level log-probs: run the backbone once, then the fused kernel on the target positions only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowalign.kernels.logprobs import fused_logprobs


@dataclass
class TokenLogProbs:
    logps: torch.Tensor  # (B, T) log-prob of token t given tokens < t; 0 where target_mask is 0
    entropy: torch.Tensor | None  # (B, T) or None
    kl: torch.Tensor | None  # (B, T) or None


def token_logprobs(bundle, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor,
                   *, temperature: float = 1.0, ref_logps: torch.Tensor | None = None,
                   kl_estimator: str = "k3", with_entropy: bool = False,
                   impl: str | None = None) -> TokenLogProbs:
    """Log-probs of ``input_ids[:, t]`` for every position with ``target_mask[:, t] == 1``, in the
    bundle's current role. Hidden states of the other positions never reach the lm_head.

    Shapes: input_ids, attention_mask, target_mask (B, T); ref_logps (B, T) aligned the same way.
    """
    hidden = bundle.hidden_states(input_ids, attention_mask)  # (B, T, d)
    return logprobs_from_hidden(bundle, hidden, input_ids, target_mask, temperature=temperature,
                                ref_logps=ref_logps, kl_estimator=kl_estimator, with_entropy=with_entropy,
                                impl=impl)


def logprobs_from_hidden(bundle, hidden: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor, *,
                         temperature: float = 1.0, ref_logps: torch.Tensor | None = None, kl_estimator: str = "k3",
                         with_entropy: bool = False, impl: str | None = None) -> TokenLogProbs:
    """As :func:`token_logprobs`, from backbone hidden states (B, T, d) already computed."""
    h, y, sel = _select(hidden, input_ids, target_mask)
    ref = ref_logps[:, 1:][sel] if ref_logps is not None else None
    head = bundle.lm_head()
    out = fused_logprobs(h, head.weight, y, bias=head.bias, lora_a=head.lora_a, lora_b=head.lora_b,
                         lora_scale=head.lora_scale, temperature=temperature, ref_logps=ref,
                         kl_estimator=kl_estimator, with_entropy=with_entropy, softcap=head.softcap,
                         impl=impl or bundle.cfg.logprob_impl)
    return TokenLogProbs(*(_scatter(v, sel) for v in (out.logps, out.entropy, out.kl)))


@dataclass
class TokenKL:
    kl: torch.Tensor  # (B, T) full-vocabulary KL(reference || policy) of the distribution predicting token t
    logps: torch.Tensor  # (B, T) policy log-prob of token t
    ref_logps: torch.Tensor  # (B, T) reference log-prob of token t (no gradient)


def kl_from_hidden(bundle, hidden: torch.Tensor, ref_hidden: torch.Tensor, ref_head, input_ids: torch.Tensor,
                   target_mask: torch.Tensor, *, temperature: float = 1.0, impl: str | None = None) -> TokenKL:
    """Exact per-token KL(reference || policy) over the whole vocabulary, plus both sides' target
    log-probs, through the fused KL kernel: ``hidden`` (B, T, d) is the policy's backbone output in the
    bundle's current role (its lm_head LoRA, if any, applies), ``ref_hidden`` and ``ref_head`` (an
    ``LMHead`` taken with ``bundle.lm_head()`` inside the reference role) the reference's. Zero where
    ``target_mask`` is 0."""
    from lowalign.kernels.kl import fused_kl

    h, y, sel = _select(hidden, input_ids, target_mask)
    g = ref_hidden[:, :-1][sel]
    head = bundle.lm_head()
    out = fused_kl(h, g, head.weight, y, bias=head.bias, lora_a=head.lora_a, lora_b=head.lora_b,
                   lora_scale=head.lora_scale, ref_lora_a=ref_head.lora_a, ref_lora_b=ref_head.lora_b,
                   ref_lora_scale=ref_head.lora_scale, temperature=temperature, softcap=head.softcap,
                   impl=impl or bundle.cfg.logprob_impl)
    return TokenKL(*(_scatter(v, sel) for v in (out.kl, out.logps, out.ref_logps)))


def _select(hidden, input_ids, target_mask):
    """Hidden states that predict the target positions (t >= 1 predicted from t - 1), those targets, and the
    (B, T-1) selection mask."""
    if bool(target_mask[:, 0].any()):
        raise ValueError("target_mask[:, 0] must be 0: the first token has no prefix to predict it from")
    sel = target_mask[:, 1:].bool()
    return hidden[:, :-1][sel], input_ids[:, 1:][sel], sel


def _scatter(v, sel):
    """(N,) values at the selected positions -> (B, T), zeros elsewhere."""
    if v is None:
        return None
    B, T1 = sel.shape
    full = torch.zeros(B, T1 + 1, device=v.device, dtype=v.dtype)
    full[:, 1:] = full[:, 1:].masked_scatter(sel, v)
    return full
