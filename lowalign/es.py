"""Evolution strategies over a flat parameter vector (ESSA: the LoRA singular values).

Memory holds one parameter vector and the optimizer moments, never the population: member ``i`` of
generation ``g`` is ``theta + sign_i sigma eps_k`` with ``eps_k`` regenerated on demand from an integer
seed (antithetic pairs share ``k``). Ranks of a distributed run exchange only fitness scalars; every
rank computes the same update from the same seeds, so all end with identical parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def member_seed(seed: int, generation: int, pair: int) -> int:
    return (seed * 1_000_003 + generation * 10_007 + pair * 101 + 7) % (2**63 - 1)


def noise(n: int, seed: int) -> torch.Tensor:
    """Standard normal (n,) regenerated from ``seed`` (float32, CPU: identical on every rank)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def share_ties(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``x`` (one value per member) with the values of members of equal fitness ``f`` replaced by their mean,
    in place: equal fitness always gets equal weight, whatever the member order."""
    for v in torch.unique(f):
        m = f == v
        x[m] = x[m].mean()
    return x


def centered_ranks(f: torch.Tensor) -> torch.Tensor:
    """Fitness shaping (Salimans et al. 2017): ranks mapped linearly to [-0.5, 0.5]; ties share a rank.

    Example: f = [3, 1, 2] -> ranks [2, 0, 1] -> [0.5, -0.5, 0.0].
    """
    n = f.numel()
    if n < 2:
        return torch.zeros_like(f)
    order = share_ties(torch.argsort(torch.argsort(f, stable=True), stable=True).float(), f)
    return order / (n - 1) - 0.5


@dataclass
class ESState:
    theta: torch.Tensor  # (n,) current parameters
    m: torch.Tensor  # Adam first moment (or CMA evolution path p_sigma)
    v: torch.Tensor  # Adam second moment (or CMA diagonal covariance)
    step: int = 0
    sigma: float = 0.03  # CMA step size (vanilla ES keeps sigma in the config)

    def state_dict(self) -> dict:
        return {"theta": self.theta, "m": self.m, "v": self.v, "step": self.step, "sigma": self.sigma}

    @classmethod
    def from_state_dict(cls, d: dict) -> ESState:
        return cls(d["theta"].clone(), d["m"].clone(), d["v"].clone(), int(d["step"]), float(d["sigma"]))


def population(state: ESState, pop_size: int, sigma: float, seed: int, generation: int, method: str = "es"):
    """Yield (member index, parameter vector) for the whole population, one vector at a time."""
    if method not in ("es", "cma"):
        raise ValueError(f"method must be 'es' or 'cma', got {method!r}")
    n = state.theta.numel()
    std = sigma if method == "es" else state.sigma * state.v.sqrt()
    for i in range(pop_size):
        eps = noise(n, member_seed(seed, generation, i // 2))
        sign = 1.0 if i % 2 == 0 else -1.0
        yield i, state.theta + sign * std * eps


def es_gradient(fitness: torch.Tensor, n: int, sigma: float, seed: int, generation: int) -> torch.Tensor:
    """Antithetic ES gradient of mean fitness: g = 1/(P sigma) sum_i u_i eps_i with centred-rank weights u."""
    u = centered_ranks(fitness)
    g = torch.zeros(n)
    for k in range(fitness.numel() // 2):
        g += (u[2 * k] - u[2 * k + 1]) * noise(n, member_seed(seed, generation, k))
    return g / (fitness.numel() * sigma)


def es_update(state: ESState, fitness: torch.Tensor, *, sigma: float, lr: float, seed: int, generation: int,
              optimizer: str = "adam", weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8) -> float:
    """Gradient *ascent* on the ES estimate (Adam or SGD), decoupled weight decay. Returns the update norm."""
    g = es_gradient(fitness, state.theta.numel(), sigma, seed, generation)
    state.step += 1
    if optimizer == "adam":
        b1, b2 = betas
        state.m.mul_(b1).add_(g, alpha=1 - b1)
        state.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        mh = state.m / (1 - b1**state.step)
        vh = state.v / (1 - b2**state.step)
        delta = lr * mh / (vh.sqrt() + eps)
    elif optimizer == "sgd":
        delta = lr * g
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    delta = delta - lr * weight_decay * state.theta
    state.theta += delta
    return float(delta.norm())


def recombination_weights(fitness: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-member weights (P,): ``w[k]`` for the member ranked k-th best (0 below the best ``len(w)``), then
    averaged over members of equal fitness, so a tie is never broken by member order. Fitness from a few
    dozen prompts ties often; broken by index, a tied antithetic pair +eps/-eps would add ``(w_a - w_b) eps``
    of pure noise to the step, where averaged it cancels.

    Example: f = [1, 3, 3, 0], w = [0.7, 0.3] -> ranks give [0, 0.7, 0.3, 0] -> the tie averaged: [0, 0.5, 0.5, 0].
    """
    out = torch.zeros(fitness.numel())
    out[torch.argsort(fitness, descending=True, stable=True)[:w.numel()]] = w.float()
    return share_ties(out, fitness)


def cma_update(state: ESState, fitness: torch.Tensor, *, seed: int, generation: int) -> float:
    """Diagonal (separable) CMA-ES step (Ros & Hansen 2008) on the antithetic population: weighted
    recombination of the best half (ties share their weights: :func:`recombination_weights`), cumulative
    step-size adaptation, rank-mu diagonal covariance update.
    ``state.m`` is the evolution path p_sigma, ``state.v`` the diagonal covariance. Returns the update norm."""
    n, P = state.theta.numel(), fitness.numel()
    mu = P // 2
    w = torch.log(torch.tensor(mu + 0.5)) - torch.log(torch.arange(1, mu + 1, dtype=torch.float32))
    w = w / w.sum()
    mueff = float(1 / (w**2).sum())
    cs = (mueff + 2) / (n + mueff + 5)
    ds = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    cmu = min(1.0, (n + 2) / 3 * (2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff)))
    D = state.v.sqrt()
    z_w, y2 = torch.zeros(n), torch.zeros(n)
    for i, wi in enumerate(recombination_weights(fitness, w).tolist()):
        if wi:
            z = noise(n, member_seed(seed, generation, i // 2)) * (1.0 if i % 2 == 0 else -1.0)
            z_w += wi * z
            y2 += wi * (D * z) ** 2
    delta = state.sigma * D * z_w
    state.theta += delta
    state.m.mul_(1 - cs).add_(z_w, alpha=math.sqrt(cs * (2 - cs) * mueff))
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    state.sigma *= math.exp((cs / ds) * (float(state.m.norm()) / chi_n - 1))
    state.v.mul_(1 - cmu).add_(y2, alpha=cmu)
    state.step += 1
    return float(delta.norm())
