"""Data parallelism over ``torchrun`` ranks, on PyTorch's own collectives (gloo on CPU, NCCL on GPUs).

Every rank loads its own base and adapters and draws the same step batch (batches are a pure function of
``(seed, step)``); each takes a contiguous slice of it (:meth:`Dist.shard`), scales its loss by its share of
the step's normalizer (rows, pairs or tokens, summed over ranks with :meth:`Dist.sum`), and the trainable
gradients are summed across ranks (:meth:`Dist.sync_grads`) before clipping. So K ranks take the optimizer
step one process takes on the whole batch: same adapters, up to fp32 reduction order. Only the adapters and
heads cross ranks; the base never does. Rank 0 writes the run directory.

With one process every method is the identity (or a local sum), so trainers call them unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch


def world_size() -> int:
    """Processes this run is launched with (``torchrun`` sets ``WORLD_SIZE``; 1 otherwise)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


class Dist:
    """This process's place among ``world`` ranks, and the few collectives trainers need."""

    def __init__(self, rank: int = 0, world: int = 1, device: str | torch.device = "cpu"):
        self.rank, self.world = rank, world
        self.device = torch.device(device)  # where collectives' buffers live (CUDA under NCCL)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run directory and prints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world})"

    # ---- splitting a step's batch -------------------------------------------------------------------

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of ``n`` rows (``n`` must split evenly)."""
        if n % self.world:
            raise ValueError(f"{n} rows do not split over {self.world} processes")
        k = n // self.world
        return self.rank * k, (self.rank + 1) * k

    def shard(self, seq: Sequence):
        """This rank's contiguous share of a list or a row tensor."""
        a, b = self.bounds(len(seq))
        return seq[a:b]

    # ---- collectives --------------------------------------------------------------------------------

    def sum(self, x):
        """Sum over ranks of a number or tensor (a new tensor / float; the input is left alone)."""
        if self.world == 1:
            return x
        t = torch.as_tensor(x, dtype=torch.float64) if not torch.is_tensor(x) else x.detach()
        t = t.to(self.device, copy=True)
        torch.distributed.all_reduce(t)
        return float(t) if not torch.is_tensor(x) else t.to(x.device)

    def mean(self, metrics: dict, weight: float = 1.0) -> dict:
        """Weighted mean over ranks of numeric metrics (each rank's value weighted by ``weight``, e.g. its
        rows). A metric only some ranks have (KTO's reward of desirable rows, when a rank has none) is the
        mean over those that have it."""
        if self.world == 1:
            return metrics
        local = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or torch.is_tensor(v)}
        names: list = [None] * self.world
        torch.distributed.all_gather_object(names, sorted(local))
        keys = sorted(set().union(*names))
        vals = torch.tensor([[local[k] * weight, weight] if k in local else [0.0, 0.0] for k in keys],
                            dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(vals)
        return {**metrics, **{k: float(vals[i, 0] / vals[i, 1]) for i, k in enumerate(keys) if vals[i, 1] > 0}}

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``t`` (N_r, ...) concatenated in rank order; a second dimension of different
        length across ranks (completion lengths) is right-padded with zeros to the longest."""
        if self.world == 1:
            return t
        src = t.device
        t = t.to(self.device)
        dims = torch.tensor(list(t.shape), dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(dims) for _ in range(self.world)]
        torch.distributed.all_gather(sizes, dims)
        if t.ndim > 1:
            width = int(max(s[1] for s in sizes))
            t = torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, width - t.shape[1]))
        parts = [torch.zeros((int(s[0]), *t.shape[1:]), dtype=t.dtype, device=t.device) for s in sizes]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts).to(src)

    def on_whole_batch(self, fn: Callable, *rows: torch.Tensor):
        """``fn`` on the step's whole batch (for statistics over all rows: batch whitening, batch std), and
        this rank's rows of its result: gathers ``rows`` (each (N_r, ...) on every rank), calls ``fn``
        (which returns a tensor or a tuple of them, row-major like its inputs), and cuts this rank's rows
        (and its own width of the inputs' second dimension, e.g. its completion length) back out."""
        if self.world == 1:
            return fn(*rows)
        n, width = rows[0].shape[0], next((r.shape[1] for r in rows if r.ndim > 1), None)
        out = fn(*(self.gather(r) for r in rows))
        a = self.rank * n  # equal shares: rank r holds rows [r n, (r + 1) n)

        def cut(o):
            o = o[a:a + n]
            return o[:, :width] if width is not None and o.ndim > 1 else o

        return tuple(cut(o) for o in out) if isinstance(out, tuple) else cut(out)

    def sync_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over ranks, in one flat buffer (the loss on each rank is already
        scaled by its share of the step's normalizer). A rank without a gradient for a parameter adds zeros;
        a parameter no rank has a gradient for keeps none (the optimizer skips it, as in one process)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params])
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [has]).to(self.device)
        torch.distributed.all_reduce(flat)
        off = 0
        for p, g, h in zip(params, grads, flat[-len(params):].tolist()):
            p.grad = flat[off:off + g.numel()].view_as(g).to(g.device, g.dtype) if h else None
            off += g.numel()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


SINGLE = Dist(0, 1)
