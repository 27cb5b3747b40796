"""Fused log-probs: naive full logits vs chunked reference vs Triton (GPU), speed and peak memory.

    .venv/bin/python benchmarks/bench_logprobs.py                       # default shapes for this device
    .venv/bin/python benchmarks/bench_logprobs.py --shapes 4096x32000x256 --dtype float32

Prints a markdown table. Each (shape, implementation) runs in a fresh worker process so peak memory is
clean: on CPU it is the growth of peak RSS over the inputs (ru_maxrss), on CUDA max_memory_allocated
over the inputs. Times are medians over --reps runs after one warm-up; forward+backward uses a
random upstream gradient on the log-probs with H and W requiring grad (``--frozen``: W frozen).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

IMPLS = ("naive", "reference", "triton")
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "4090": 165.0}  # dense bf16


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl, N, V, d, dtype, reps, frozen) -> dict:
    from lowalign.kernels.logprobs import fused_logprobs

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, d, device=dev, dtype=dt, generator=g).requires_grad_()
    w = (torch.randn(V, d, device=dev, dtype=dt, generator=g) * d**-0.5).requires_grad_(not frozen)
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    up = torch.randn(N, device=dev, generator=g)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            return fused_logprobs(h, w, y, impl=impl).logps

    def fwd_bwd():
        lp = fused_logprobs(h, w, y, impl=impl).logps
        lp.backward(up)
        h.grad = None
        w.grad = None

    out = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        fn()
        sync()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_now()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        if dev == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        out[name] = {"ms": statistics.median(ts) * 1e3, "peak_mb": max(0, peak) / 2**20}
    return out


def run_worker(impl, N, V, d, dtype, reps, frozen, env=None):
    cmd = [sys.executable, __file__, "--worker", impl, "--shapes", f"{N}x{V}x{d}", "--dtype", dtype,
           "--reps", str(reps)]
    if frozen:
        cmd.append("--frozen")
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", help="NxVxd ...")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--frozen", action="store_true", help="frozen lm_head (no weight gradient)")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--sweep", nargs="*", default=None, metavar="BN,BV,BD,WARPS,STAGES",
                    help="time the Triton kernels at these tile sizes / launch shapes (forward and backward alike)")
    ap.add_argument("--max-naive-gb", type=float, default=40.0, help="skip naive beyond this logits budget")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    if a.worker:
        N, V, d = map(int, a.shapes[0].split("x")) if a.shapes else (0, 0, 0)
        print(json.dumps(worker(a.worker, N, V, d, dtype, a.reps, a.frozen)))
        return
    shapes = a.shapes or (
        [f"{n}x{v}x{d}" for n in (2048, 8192) for v in (32000, 151936) for d in (256, 896)] if cuda
        else ["2048x32000x256", "4096x32000x256", "2048x151936x896"])
    if a.sweep:
        print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, {dtype}, lm_head "
              f"{'frozen' if a.frozen else 'trainable'}, Triton tile sweep\n")
        print("| N x V x d | BLOCK_N,BLOCK_V,BLOCK_D,warps,stages | fwd ms | fwd+bwd ms | bwd ms | fwd TFLOP/s |")
        print("|---|---|---|---|---|---|")
        for s in a.shapes:
            N, V, d = map(int, s.split("x"))
            for c in a.sweep:
                r = run_worker("triton", N, V, d, dtype, a.reps, a.frozen,
                               {"LOWALIGN_TRITON_BLOCKS": c, "LOWALIGN_TRITON_BLOCKS_BWD": c})
                if "error" in r:
                    print(f"| {s} | {c} | {r['error']} | | | |")
                    continue
                f, fb = r["fwd"]["ms"], r["fwd_bwd"]["ms"]
                print(f"| {s} | {c} | {f:.1f} | {fb:.1f} | {fb - f:.1f} | {2 * N * d * V / f / 1e9:.0f} |", flush=True)
        return
    impls = IMPLS if cuda else IMPLS[:2]
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    peak = next((v for k, v in PEAK_TFLOPS.items() if cuda and k in dev_name), None)
    print(f"device: {dev_name}, dtype {dtype}, lm_head {'frozen' if a.frozen else 'trainable'}, "
          f"median of {a.reps}\n")
    hdr = "| N x V x d | impl | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | time vs naive | mem vs naive |"
    if cuda:
        hdr += " fwd TFLOP/s | fwd+bwd TFLOP/s |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for s in a.shapes or shapes:
        N, V, d = map(int, s.split("x"))
        res = {}
        for impl in impls:
            if impl == "naive" and 3 * N * V * 4 / 2**30 > a.max_naive_gb:
                res[impl] = {"error": f"skipped (> {a.max_naive_gb:g} GB of logits)"}
            else:
                res[impl] = run_worker(impl, N, V, d, dtype, a.reps, a.frozen)
        nv = res.get("naive", {})
        for impl in impls:
            r = res[impl]
            if "error" in r:
                print(f"| {s} | {impl} | {r['error']} | | | | | |" + (" | |" if cuda else ""))
                continue
            tr = (f"{r['fwd_bwd']['ms'] / nv['fwd_bwd']['ms']:.2f}x" if "fwd_bwd" in nv else "-")
            mr = (f"{r['fwd_bwd']['peak_mb'] / max(nv['fwd_bwd']['peak_mb'], 1e-9):.3f}x" if "fwd_bwd" in nv else "-")
            row = (f"| {s} | {impl} | {r['fwd']['ms']:.1f} | {r['fwd_bwd']['ms']:.1f} | {r['fwd']['peak_mb']:.0f} | "
                   f"{r['fwd_bwd']['peak_mb']:.0f} | {tr} | {mr} |")
            if cuda:
                tf = 2 * N * d * V / (r["fwd"]["ms"] / 1e3) / 1e12
                row += f" {tf:.0f}" + (f" ({100 * tf / peak:.0f}% of {peak:g})" if peak else "") + " |"
                # backward recomputes the logits tile (2NdV) and forms grad_h (2NdV), + grad_W (2NdV) if trainable
                tb = (6 if a.frozen else 8) * N * d * V / (r["fwd_bwd"]["ms"] / 1e3) / 1e12
                row += f" {tb:.0f}" + (f" ({100 * tb / peak:.0f}%)" if peak else "") + " |"
            print(row)


if __name__ == "__main__":
    main()
