"""Run by tests/test_distributed.py under torchrun (2 gloo processes): each rank exercises lowalign.distributed
and writes what it got to OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch

from lowalign.distributed import Dist


def main(out: Path) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        d = Dist(rank, world)
        res = {"bounds": d.bounds(6), "shard": d.shard(list("abcdef")), "sum": d.sum(rank + 1.5),
               "tsum": d.sum(torch.tensor([1.0, rank])).tolist()}
        # metrics: rank 1 lacks "only0"; weights 1 and 3
        res["mean"] = d.mean({"x": float(rank), "only0": 5.0} if rank == 0 else {"x": 2.0}, weight=1 + 2 * rank)
        # ragged second dimension: rank 0 has width 2, rank 1 width 3
        t = torch.arange(2 * (2 + rank), dtype=torch.float32).view(2, 2 + rank) + 10 * rank
        res["gather"] = d.gather(t).tolist()
        res["whole"] = [x.tolist() for x in d.on_whole_batch(lambda a: (a - a.mean(), a.sum(1)), t)]
        p = torch.nn.Parameter(torch.zeros(3))
        q = torch.nn.Parameter(torch.zeros(2))  # no gradient on rank 0
        r = torch.nn.Parameter(torch.zeros(2))  # no gradient anywhere: stays None (the optimizer skips it)
        p.grad = torch.full((3,), float(rank + 1))
        if rank:
            q.grad = torch.ones(2)
        d.sync_grads([p, q, r])
        res["grads"] = (p.grad.tolist(), q.grad.tolist(), r.grad)
        (out / f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
