"""ESSA: evolution strategies over the singular values of the policy LoRA (arXiv 2507.04453).

Each LoRA update is written ``scale * B A = U diag(s) V^T`` (SVD; a fresh LoRA gets random orthonormal
``U, V``); ``U`` and ``V`` are frozen and only ``s`` evolves, so training is forward passes only: no
autograd, no optimizer state over weights, and the base can stay in nf4/int8 inference mode. The
adapter is stored as ``A = V^T``, ``B = U diag(s) / scale``, so it exports as an ordinary PEFT adapter.

Distributed (``torchrun --nproc_per_node K -m lowalign run RECIPE``): rank ``r`` evaluates members
``i % K == r``; ranks all-reduce only fitness scalars and derive every perturbation from shared seeds.
"""

from __future__ import annotations

import math
import time

import torch

from lowalign.algorithms import register
from lowalign.algorithms.common import end_step, finish, reward_sources, start_or_resume
from lowalign.algorithms.configs import ESSAConfig
from lowalign.es import ESState, cma_update, es_update, population
from lowalign.generation import generate, row_seed
from lowalign.rewards import row_columns
from lowalign.runtime import PHASES, Progress, peak_memory_bytes, seed_everything

POLICY = "policy"


def top_singular_vectors(W: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``r`` SVD of ``W`` (d_out, d_in) as (U (d_out, r), s (r,), Vh (r, d_in)), float32 on W's device:
    exact for small matrices, randomized (Halko et al., 4 power iterations, seeded) for large ones."""
    if min(W.shape) <= 1024:
        U, s, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        return U[:, :r], s[:r], Vh[:r]
    with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []):
        torch.manual_seed(seed)
        U, s, V = torch.svd_lowrank(W.float(), q=min(r + 16, min(W.shape)), niter=4)
    return U[:, :r], s[:r], V[:, :r].T


class SingularValueLoRA:
    """The policy adapter re-parameterized by its singular values: ``theta`` = the evolving ones."""

    def __init__(self, bundle, fresh: bool, seed: int, s_init: float, top_fraction: float, subspace: str = "base"):
        self.mods = bundle.lora_factors(POLICY)
        g = torch.Generator().manual_seed(seed)
        self.U, self.s0, self.sel = [], [], []
        with torch.no_grad():
            for name, A, B, scale in self.mods:
                r, d_in = A.shape
                d_out = B.shape[0]
                if fresh:  # the base weight's top-r singular directions, or random orthonormal ones
                    if subspace == "base":
                        U, _, Vh = top_singular_vectors(bundle.base_weight(name), r, seed)
                    else:
                        U = torch.linalg.qr(torch.randn(d_out, r, generator=g))[0]
                        Vh = torch.linalg.qr(torch.randn(d_in, r, generator=g))[0].T
                    s = torch.full((r,), float(s_init))
                else:  # SVD of the existing update
                    U, s, Vh = torch.linalg.svd(scale * B.float().cpu() @ A.float().cpu(), full_matrices=False)
                    U, s, Vh = U[:, :r], s[:r], Vh[:r]
                A.copy_(Vh.to(A))
                k = max(1, math.ceil(top_fraction * r))
                self.U.append(U.to(B.device, torch.float32))
                self.s0.append(s.clone())
                self.sel.append(torch.argsort(s, descending=True, stable=True)[:k])
        self.sizes = [len(i) for i in self.sel]

    def initial_theta(self) -> torch.Tensor:
        return torch.cat([s[i] for s, i in zip(self.s0, self.sel)]).float()

    @torch.no_grad()
    def apply(self, theta: torch.Tensor) -> None:
        """Write ``B = U diag(s) / scale`` for every module, with the selected entries of s from theta."""
        for (_, _, B, scale), U, s in zip(self.mods, self.U, self._values(theta[None])):
            B.copy_((U * (s[0].to(U.device) / scale)).to(B))

    @torch.no_grad()
    def apply_unit(self) -> None:
        """``B = U / scale`` (s = 1): the singular values then come from :meth:`member_scales`, per row."""
        for (_, _, B, scale), U in zip(self.mods, self.U):
            B.copy_((U / scale).to(B))

    def member_scales(self, thetas: torch.Tensor, repeat: int) -> dict[str, torch.Tensor]:
        """Per-row singular values for ``ModelBundle.row_scales`` (with :meth:`apply_unit`): member ``k`` of
        ``thetas`` (M, n) on rows ``[k repeat, (k + 1) repeat)``; (M repeat, r) per module."""
        return {name: s.repeat_interleave(repeat, 0) for (name, *_), s in zip(self.mods, self._values(thetas))}

    def _values(self, thetas: torch.Tensor) -> list[torch.Tensor]:
        """The full singular values (M, r) of every module: the frozen ones, the selected from ``thetas``."""
        out, off = [], 0
        for s0, sel, n in zip(self.s0, self.sel, self.sizes):
            s = s0.float().expand(thetas.shape[0], -1).clone()
            s[:, sel] = thetas[:, off:off + n].float()
            off += n
            out.append(s)
        return out


@torch.no_grad()
def member_completions(bundle, sv: SingularValueLoRA, thetas: torch.Tensor, rows, tc, seed: int) -> list[list[str]]:
    """Every member's completions of ``rows``: members stacked into generation calls of up to
    ``tc.eval_batch_rows`` rows (members x prompts), each row decoding with its member's singular values
    (one backbone, per-row scales between the LoRA matmuls). Sampling gives prompt ``i`` the same random
    stream for every member (common random numbers), whatever the batching. Leaves B at ``U / scale``."""
    P, M = len(rows), thetas.shape[0]
    per = max(1, tc.rows_per_call(bundle.device.type) // P)
    prompts = [r["prompt"] for r in rows]
    sv.apply_unit()
    texts = []
    for c in range(0, M, per):
        k = min(per, M - c)
        seeds = [row_seed(seed, i) for _ in range(k) for i in range(P)] if tc.do_sample else None
        with bundle.use(POLICY), bundle.row_scales(POLICY, sv.member_scales(thetas[c:c + k], P)):
            roll = generate(bundle, prompts * k, max_new_tokens=tc.max_new_tokens, do_sample=tc.do_sample,
                            temperature=tc.temperature, row_seeds=seeds)
        texts += [roll.texts[j * P:(j + 1) * P] for j in range(k)]
    return texts


def member_fitness(bundle, rewards, sv, thetas: torch.Tensor, rows, tc, seed: int) -> torch.Tensor:
    """Mean reward of each member's completions of ``rows``: (M,) float64 (one reward call for all)."""
    texts = member_completions(bundle, sv, thetas, rows, tc, seed)
    M = len(texts)
    cols = {k: v * M for k, v in row_columns(rows).items()}
    total = rewards([r["prompt"] for r in rows] * M, [t for ts in texts for t in ts], cols).total
    return total.double().view(M, len(rows)).mean(1)


def calibrate_sigma(bundle, sv, theta, rows, tc, seed: int, console) -> float:
    """Smallest sigma = tc.sigma * 2^k whose perturbations change >= calibrate_target of the completions
    (mean over two antithetic pairs, evaluated with the centre in one batch). Deterministic: depends only on
    seed, data and weights."""
    from lowalign.es import noise

    sigma = tc.sigma
    eps = torch.stack([noise(theta.numel(), seed * 13 + k) for k in range(2)])
    for _ in range(16):
        members = torch.stack([theta, *(theta + sign * sigma * e for e in eps for sign in (1.0, -1.0))])
        center, *perturbed = member_completions(bundle, sv, members, rows, tc, seed)
        changed = sum(sum(a != b for a, b in zip(t, center)) for t in perturbed) / len(rows) / len(perturbed)
        if changed >= tc.calibrate_target:
            break
        sigma *= 2
    sv.apply(theta)
    console.print(f"essa: calibrated sigma = {sigma:.4g} (perturbations change {changed:.0%} of completions)")
    return sigma


def check(cfg) -> None:
    if cfg.train.population_size < 2 or cfg.train.population_size % 2:
        from lowalign.config import ConfigError

        raise ConfigError("train.population_size: must be even and >= 2 (antithetic pairs)")


def train(ctx) -> dict:
    cfg, tc, bundle = ctx.cfg, ctx.cfg.train, ctx.bundle
    rank, world = ctx.dist.rank, ctx.dist.world
    bundle.add_adapter(POLICY, cfg.lora, init_from=cfg.lora.init_from)
    for p in bundle.base.parameters():
        p.requires_grad_(False)
    bundle.base.eval()
    sv = SingularValueLoRA(bundle, fresh=cfg.lora.init_from is None, seed=cfg.seed, s_init=tc.s_init,
                           top_fraction=tc.top_fraction, subspace=tc.subspace)
    theta0 = sv.initial_theta()
    n = theta0.numel()
    if tc.sigma_mode == "calibrate":
        rows0 = ctx.data.batch(0, tc.prompts_per_generation, cfg.seed)
        sigma = calibrate_sigma(bundle, sv, theta0, rows0, tc, cfg.seed, ctx.console)
    else:
        sigma = tc.sigma * (theta0.abs().mean().item() if tc.sigma_mode == "relative" else 1.0)
    state = ESState(theta0.clone(), torch.zeros(n), torch.ones(n) if tc.optimizer == "cma" else torch.zeros(n),
                    sigma=sigma)
    rewards = reward_sources(ctx)
    sv.apply(state.theta)

    # plain inference (the adapter as weights, no per-row scales) of the largest batch the run generates:
    # the memory yardstick for the run
    rows0 = ctx.data.batch(0, tc.prompts_per_generation, cfg.seed)
    per = max(1, min(tc.rows_per_call(bundle.device.type) // len(rows0), -(-tc.population_size // world)))
    with torch.no_grad(), bundle.use(POLICY):
        plain = generate(bundle, [r["prompt"] for r in rows0] * per, max_new_tokens=tc.max_new_tokens,
                         do_sample=False)
    rewards([r["prompt"] for r in rows0] * per, plain.texts, {k: v * per for k, v in row_columns(rows0).items()})
    inference_peak = peak_memory_bytes(bundle.device)

    start, baseline = start_or_resume(ctx, [POLICY], None, None)
    if ctx.resumed_state:
        state = ESState.from_state_dict(ctx.resumed_state["extra"]["es"])
    sv.apply(state.theta)
    t_start = time.time()
    with Progress(tc.generations, start, ("fitness/mean", "fitness/max", "sigma", "members_per_s"),
                  desc="essa", every=tc.log_every) as bar, torch.no_grad():
        for gen in range(start, tc.generations):
            if tc.max_time_s and time.time() - t_start > tc.max_time_s:
                break
            t0 = time.time()
            seed_everything(cfg.seed * 7_919 + gen)
            rows = ctx.data.batch(gen, tc.prompts_per_generation, cfg.seed)
            fit = torch.zeros(tc.population_size, dtype=torch.float64)
            method = "cma" if tc.optimizer == "cma" else "es"
            mine = [(i, th) for i, th in population(state, tc.population_size, sigma, cfg.seed, gen, method)
                    if i % world == rank]  # this rank's members, evaluated in batches of members x prompts
            with PHASES.phase("population"):
                fit[[i for i, _ in mine]] = member_fitness(bundle, rewards, sv, torch.stack([th for _, th in mine]),
                                                           rows, tc, seed=cfg.seed * 31 + gen)
            fit = ctx.dist.sum(fit).float()  # only fitness scalars cross ranks
            if tc.optimizer == "cma":
                norm = cma_update(state, fit, seed=cfg.seed, generation=gen)
            else:
                norm = es_update(state, fit, sigma=sigma, lr=tc.learning_rate, seed=cfg.seed, generation=gen,
                                 optimizer=tc.optimizer, weight_decay=tc.weight_decay)
            sv.apply(state.theta)
            dt = time.time() - t0
            m = {"step": gen + 1, "fitness/mean": fit.mean().item(), "fitness/max": fit.max().item(),
                 "fitness/min": fit.min().item(), "fitness/std": fit.std().item(), "update_norm": norm,
                 "theta_norm": float(state.theta.norm()), "sigma": state.sigma if tc.optimizer == "cma" else sigma,
                 "evals_per_s": round(tc.population_size * tc.prompts_per_generation / dt, 1),
                 "members_per_s": round(tc.population_size / dt, 2),
                 "time/generation_s": round(dt, 3), "elapsed_s": round(time.time() - t_start, 2)}
            end_step(ctx, tc, gen + 1, m, bar, [POLICY], baseline, extra={"es": state.state_dict()},
                     total=tc.generations)
    summary = finish(ctx, [POLICY], baseline, {"generations": state.step, "num_singular_values": n,
                                               "sigma": sigma, "world_size": world})
    summary["inference_peak_memory_bytes"] = inference_peak
    summary["peak_memory_ratio_to_inference"] = round(peak_memory_bytes(bundle.device) / inference_peak, 3)
    summary["theta"] = state.theta.tolist()
    return summary


register("essa", ESSAConfig, train, check=check, shards="population_size")
