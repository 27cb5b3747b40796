"""Peak RSS of one training micro-batch on a CPU, by gradient checkpointing mode.

    python benchmarks/bench_train_memory.py --model package:smollm2-135m-instruct --rows 8 --new-tokens 128

One micro-batch of ``--rows`` rows (the built-in task's chat prompt + ``--new-tokens`` completion tokens)
through the trainers' path (the backbone under the policy LoRA, fused log-probs, backward), ``--reps`` times
in one process; before each, the freed heap goes back to the OS and the peak counter (``VmHWM``) is reset.
Each mode runs in its own process: ``reentrant`` (what ``ModelBundle`` uses), ``non-reentrant`` (what it used
before 2026-12-03) and ``none``. Also prints glibc's heap (``mallinfo2``: arena size and bytes in use) after
the forward, which shows the difference: the bytes in use are the same, the heap is not. Linux + glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
MODES = ("reentrant", "non-reentrant", "none")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def worker(args) -> dict:
    from bench_rollout import chat_prompts

    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.generation import encode_prompts
    from lowalign.logprobs import token_logprobs
    from lowalign.runtime import CLEAR_REFS, proc_status, release_cpu_memory

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    b = ModelBundle.load(ModelConfig(name_or_path=args.model, gradient_checkpointing=args.worker != "none"))
    if args.worker == "non-reentrant":
        b.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        b._recompute_in_forward_role()
    torch.manual_seed(0)
    b.add_adapter("policy", LoraConfig(r=16, alpha=32))
    ids, mask = encode_prompts(b.tokenizer, chat_prompts(args.model, 1), b.device)
    ids, mask = ids.repeat(args.rows, 1), mask.repeat(args.rows, 1)
    comp = torch.randint(100, b.base.config.vocab_size - 100, (args.rows, args.new_tokens),
                         generator=torch.Generator().manual_seed(0))
    full, fmask = torch.cat([ids, comp], 1), torch.cat([mask, torch.ones_like(comp)], 1)
    tmask = torch.cat([torch.zeros_like(mask), torch.ones_like(comp)], 1)
    b.base.train()
    reps = []
    for _ in range(args.reps):
        release_cpu_memory()
        CLEAR_REFS.write_text("5")
        start = proc_status("VmRSS")
        t0 = time.perf_counter()
        with b.use("policy"):
            lp = token_logprobs(b, full, fmask, tmask).logps
        t1 = time.perf_counter()
        heap = libc.mallinfo2()
        (-lp.sum()).backward()
        t2 = time.perf_counter()
        reps.append({"start_mib": start / 2**20, "peak_mib": proc_status("VmHWM") / 2**20, "forward_s": t1 - t0,
                     "backward_s": t2 - t1, "heap_mib": heap.arena / 2**20, "in_use_mib": heap.uordblks / 2**20})
        del lp
    return {"mode": args.worker, "reps": reps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="package:smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from lowalign.models import resolve_path

    resolve_path(args.model)  # convert a GGUF once, before the workers
    print(f"\n{args.model}: one micro-batch of {args.rows} rows x (prompt + {args.new_tokens}) tokens, LoRA r16, "
          f"{torch.get_num_threads()} threads; each repetition after a heap trim and a peak reset\n")
    print("| checkpointing | rep | RSS at start MiB | peak RSS MiB | heap after forward MiB | of it in use MiB "
          "| forward s | backward s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--rows", str(args.rows),
               "--new-tokens", str(args.new_tokens), "--reps", str(args.reps)]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, check=True).stdout
        for i, r in enumerate(json.loads(out.strip().splitlines()[-1])["reps"]):
            print(f"| {mode} | {i} | {r['start_mib']:.0f} | {r['peak_mib']:.0f} | {r['heap_mib']:.0f} | "
                  f"{r['in_use_mib']:.0f} | {r['forward_s']:.2f} | {r['backward_s']:.2f} |")


if __name__ == "__main__":
    main()
