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
    B, T = input_ids.shape
    if bool(target_mask[:, 0].any()):
        raise ValueError("target_mask[:, 0] must be 0: the first token has no prefix to predict it from")
    sel = target_mask[:, 1:].bool()  # (B, T-1) positions t>=1 predicted from hidden at t-1
    h = hidden[:, :-1][sel]  # (N, d)
    y = input_ids[:, 1:][sel]  # (N,)
    ref = ref_logps[:, 1:][sel] if ref_logps is not None else None
    head = bundle.lm_head()
    out = fused_logprobs(h, head.weight, y, bias=head.bias, lora_a=head.lora_a, lora_b=head.lora_b,
                         lora_scale=head.lora_scale, temperature=temperature, ref_logps=ref,
                         kl_estimator=kl_estimator, with_entropy=with_entropy, softcap=head.softcap,
                         impl=impl or bundle.cfg.logprob_impl)

    def scatter(v):
        if v is None:
            return None
        full = torch.zeros(B, T, device=v.device, dtype=v.dtype)
        full[:, 1:] = full[:, 1:].masked_scatter(sel, v)
        return full

    return TokenLogProbs(scatter(out.logps), scatter(out.entropy), scatter(out.kl))
