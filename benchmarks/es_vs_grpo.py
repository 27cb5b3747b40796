"""ESSA vs GRPO on the tiny arithmetic task under the same wall-clock budget (CPU or GPU), and ESSA's
population throughput, batched (members x prompts in one generation call) vs one member per call.

    .venv/bin/python benchmarks/es_vs_grpo.py [--budget 300] [--quantization nf4] [--populations 8 32 128]
    .venv/bin/python benchmarks/es_vs_grpo.py --throughput-only [--prompts 64 8]   # just the throughput table
    python3 benchmarks/es_vs_grpo.py --throughput-only --size 0.5b          # a real-size model (GPU)

Throughput: the es_tiny recipe's model, adapter and decoding (greedy, 6 tokens), a population of perturbed
singular values, fitness of every member timed after one warm-up, with one member per generation call (the
sequential path: `train.eval_batch_rows` = prompts per member) and with the recipe's rows per call (members
batched, each row with its own singular values), for the recipe's 64 prompts per member and a small
minibatch of 8. Then `lowalign run` for each method (same base, same quantization, same held-out set) with a
training time limit, evaluating greedy held-out accuracy along the way; accuracy against training wall time
plus peak memory. Evaluation time is inside the budget for both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(recipe: str, out: Path, budget: float, quant: str, extra: list[str]) -> tuple[dict, list[dict]]:
    cmd = [sys.executable, "-m", "lowalign", "run", f"recipes/{recipe}", f"output_dir={out}",
           f"train.max_time_s={budget}", f"model.quantization={quant}", "eval.num_examples=500", *extra]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{p.stderr[-2000:]}")
    summ = json.loads((out / "summary.json").read_text())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return summ, rows


def essa_bundle(cfg):
    """The base of ``cfg`` with a fresh policy adapter set up as an ESSA run of ``cfg`` sets it up (its seed,
    rank, subspace, s_init, top_fraction): (bundle, SingularValueLoRA)."""
    import torch

    from lowalign.algorithms.essa import POLICY, SingularValueLoRA
    from lowalign.bundle import ModelBundle

    tc = cfg.train
    torch.manual_seed(cfg.seed)
    b = ModelBundle.load(cfg.model)
    b.add_adapter(POLICY, cfg.lora)
    return b, SingularValueLoRA(b, fresh=True, seed=cfg.seed, s_init=tc.s_init, top_fraction=tc.top_fraction,
                                subspace=tc.subspace)


def throughput(populations: list[int], quant: str, prompt_counts: list[int], reps: int = 2,
               size: str | None = None) -> None:
    """Members and completions per second, batched vs one member per call, in this process, with the
    es_tiny recipe's model, adapter (rank, subspace) and decoding; ``size`` ("0.5b", "1.5b"): a random-weight
    Qwen2.5-shaped model instead (bench_rollout.build_model; its completions are noise, the timing is real)."""
    import time
    from dataclasses import replace

    import torch

    from lowalign.algorithms.essa import member_fitness
    from lowalign.api import load_config
    from lowalign.es import ESState, population
    from lowalign.rewards import RewardSources
    from lowalign.tasks.arithmetic import ArithmeticTask

    model = []
    if size:
        from bench_rollout import build_model  # this folder is on sys.path when run as a script

        model = [f"model.name_or_path={build_model(size, Path(tempfile.gettempdir()) / f'lowalign_{size}')}"]
    cfg = load_config(REPO / "recipes/es_tiny.yaml", [f"model.quantization={quant}", *model])
    tc = cfg.train
    b, sv = essa_bundle(cfg)
    theta = sv.initial_theta()
    rewards = RewardSources(cfg.rewards)
    state = ESState(theta, torch.zeros_like(theta), torch.zeros_like(theta))
    batched_rows = tc.rows_per_call(b.device.type)
    what = f"random-weight Qwen2.5-{size} shape" if size else cfg.model.name_or_path
    print(f"ESSA population throughput on {b.device}: {what} ({quant}), LoRA r{cfg.lora.r} ({tc.subspace} "
          f"subspace), greedy {tc.max_new_tokens} tokens; sequential = one member per generation call, batched = "
          f"{batched_rows} rows (members x prompts) per call; fitness of every member, best of {reps} after a "
          f"warm-up; {torch.get_num_threads()} threads\n")
    print("| prompts per member | population | path | rows per call | members/s | completions/s | "
          "batched / sequential |")
    print("|---|---|---|---|---|---|---|")
    for prompts in prompt_counts:
        rows = ArithmeticTask().train_rows(prompts, seed=1)
        for pop in populations:
            thetas = torch.stack([th for _, th in population(state, pop, 0.05, 0, 0)])
            rate = {}
            for name, rows_per_call in (("sequential", prompts), ("batched", batched_rows)):
                c = replace(tc, eval_batch_rows=rows_per_call)
                member_fitness(b, rewards, sv, thetas[:2], rows, c, seed=0)  # warm-up
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    member_fitness(b, rewards, sv, thetas, rows, c, seed=0)
                    best = min(best, time.perf_counter() - t0)
                rate[name] = pop / best
                ratio = f"{rate['batched'] / rate['sequential']:.1f}x" if name == "batched" else ""
                per_call = min(pop * prompts, max(prompts, rows_per_call // prompts * prompts))
                print(f"| {prompts} | {pop} | {name} | {per_call} | {rate[name]:.2f} | {rate[name] * prompts:.0f} | "
                      f"{ratio} |", flush=True)
    print()
    ceiling(b, tc, prompt_counts, reps)


def ceiling(b, tc, prompt_counts: list[int], reps: int) -> None:
    """The most any grouping of rows can gain on this device: plain greedy decoding with the adapter off (no
    LoRA matmuls, no per-row scales) at one member's call size against the best of bigger calls."""
    import time

    import torch

    from lowalign.generation import generate
    from lowalign.tasks.arithmetic import ArithmeticTask

    print("Ceiling: plain inference (adapter off) of the same prompts, rows/s by rows per call; the best bigger call "
          "over one member's call bounds what batching members can gain here\n")
    print("| prompts per member | rows per call | rows/s | / rows/s at one member's call |")
    print("|---|---|---|---|")
    for prompts in prompt_counts:
        base_prompts = [r["prompt"] for r in ArithmeticTask().train_rows(prompts, seed=1)]
        first = None
        for rows in [prompts] + [n for n in (256, 1024, 2048) if n > prompts]:
            batch = base_prompts * (rows // prompts)
            with b.use("reference"), torch.no_grad():
                generate(b, batch, max_new_tokens=tc.max_new_tokens, do_sample=False)  # warm-up
                best = float("inf")
                calls = max(1, 2048 // rows)  # about 2048 rows timed at every size
                for _ in range(reps):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        generate(b, batch, max_new_tokens=tc.max_new_tokens, do_sample=False)
                    best = min(best, (time.perf_counter() - t0) / (calls * len(batch)))
            first = first or 1 / best
            print(f"| {prompts} | {len(batch)} | {1 / best:.0f} | {(1 / best) / first:.2f}x |", flush=True)
    print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds for each method")
    ap.add_argument("--quantization", default="nf4")
    ap.add_argument("--populations", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 8],
                    help="prompts per member for the throughput table (the recipe's 64, and a small minibatch)")
    ap.add_argument("--size", choices=["0.5b", "1.5b"], help="throughput on a random-weight Qwen2.5-shaped model "
                    "of this size instead of builtin:tiny (for a GPU)")
    ap.add_argument("--throughput-only", action="store_true")
    args = ap.parse_args()
    throughput(args.populations, args.quantization, args.prompts, size=args.size)
    if args.throughput_only:
        return
    tmp = Path(tempfile.mkdtemp(prefix="es_vs_grpo_"))
    res = {}
    # GRPO: ~0.4-0.6 s/step on 2 CPU cores -> eval every 50 steps; ES: ~1 s/generation -> every 50
    res["GRPO"] = run("grpo_tiny.yaml", tmp / "grpo", args.budget, args.quantization,
                      ["train.steps=100000", "eval.every=50", "train.optim.schedule=constant",
                       "train.checkpoint_every=0"])
    res["ESSA"] = run("es_tiny.yaml", tmp / "essa", args.budget, args.quantization,
                      ["train.generations=100000", "eval.every=50", "train.checkpoint_every=0"])
    print(f"budget {args.budget:.0f} s of training per method, base quantization {args.quantization}\n")
    print("| method | train time (s) | held-out greedy accuracy |")
    print("|---|---|---|")
    for name, (summ, rows) in res.items():
        print(f"| {name} | 0 | {summ['baseline']['accuracy']:.3f} |")
        for r in rows:
            if "eval/accuracy" in r:
                print(f"| {name} | {r['elapsed_s']:.0f} | {r['eval/accuracy']:.3f} |")
        last = rows[-1]["elapsed_s"] if rows else 0
        print(f"| {name} (final) | {last:.0f} | {summ['final']['accuracy']:.3f} |")
    print("\n| method | steps/generations | peak memory (MiB, process RSS on CPU) | wall time incl. load+evals (s) |")
    print("|---|---|---|---|")
    for name, (summ, rows) in res.items():
        print(f"| {name} | {len(rows)} | {summ['peak_memory_bytes'] / 2**20:.0f} | {summ['wall_time_s']:.0f} |")


if __name__ == "__main__":
    main()
