"""Small tensor helpers shared by the losses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """A scalar ``loss`` to backpropagate and detached ``metrics`` to log."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (denominator clamped to >= 1)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def bessel_std(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Sample standard deviation with Bessel's correction (n - 1); NaN for a single element."""
    return x.std(dim=dim, unbiased=True) if dim is not None else x.std(unbiased=True)
