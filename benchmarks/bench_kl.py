"""The fused full-vocabulary KL(reference || policy) against ``kl_div`` on full logits: time and peak memory.

    .venv/bin/python benchmarks/bench_kl.py                       # CPU: the chunked reference vs naive
    .venv/bin/python benchmarks/bench_kl.py --device cuda         # GPU: + the Triton kernel

Each row runs in a fresh process: policy hidden states (trainable), reference hidden states (constant) and a
frozen lm_head, then forward + backward of ``sum(kl) + sum(logps)``. Peak = growth of the process's peak over
its level with the inputs allocated (RSS on CPU, CUDA allocated memory on a GPU), measured after a warm-up.
The column "x logits" divides it by the size of ONE fp32 [N x V] logits tensor (the naive path needs two,
plus their softmaxes and gradients). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def worker(impl: str, N: int, V: int, d: int, device: str, dtype: str) -> dict:
    import resource

    from lowalign.kernels.kl import fused_kl

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=g).to(device, dt).requires_grad_()
    ref = torch.randn(N, d, generator=g).to(device, dt)
    w = (torch.randn(V, d, generator=g) * d**-0.5).to(device, dt)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    cuda = device == "cuda"

    def once(n):
        out = fused_kl(h[:n], ref[:n], w, y[:n], impl=impl)
        (out.kl.sum() + out.logps.sum()).backward()
        if cuda:
            torch.cuda.synchronize()

    once(min(N, 64))  # warm-up
    h.grad = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.time()
    once(N)
    ms = (time.time() - t) * 1000
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"impl": impl, "ms": ms, "peak": max(0, peak - base)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shapes", nargs="*", default=["4096x32000x64", "4096x32000x256", "2048x151936x256"],
                    help="N x V x d")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, N, V, d, dtype = args.worker
        print(json.dumps(worker(impl, int(N), int(V), int(d), args.device, dtype)))
        return
    impls = ["naive", "reference"] + (["triton"] if args.device == "cuda" else [])
    print(f"device {args.device}, {args.dtype}, forward + backward, frozen lm_head\n")
    print("| N x V x d | impl | fwd+bwd ms | peak MiB | x one fp32 logits tensor | time vs naive |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        N, V, d = map(int, shape.split("x"))
        rows = []
        for impl in impls:
            p = subprocess.run([sys.executable, __file__, "--device", args.device, "--worker", impl, str(N), str(V),
                                str(d), args.dtype], capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"{impl} {shape} failed:\n{p.stderr[-2000:]}")
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        logits = N * V * 4
        for r in rows:
            print(f"| {shape} | {r['impl']} | {r['ms']:.0f} | {r['peak'] / 2**20:.0f} | {r['peak'] / logits:.3f} | "
                  f"{r['ms'] / rows[0]['ms']:.2f}x |")


if __name__ == "__main__":
    main()
