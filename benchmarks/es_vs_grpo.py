"""ESSA vs GRPO on the tiny arithmetic task under the same wall-clock budget (CPU or GPU).

    .venv/bin/python benchmarks/es_vs_grpo.py [--budget 300] [--quantization nf4] [--eval-every-s 60]

Runs `lowalign run` for each (same base, same quantization, same held-out set) with a training time
limit, evaluating greedy held-out accuracy along the way, and prints accuracy against training wall
time plus peak memory. Evaluation time is inside the budget for both.
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds for each method")
    ap.add_argument("--quantization", default="nf4")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="es_vs_grpo_"))
    res = {}
    # GRPO: ~0.4-0.6 s/step on 2 CPU cores -> eval every 50 steps; ES: ~3.5 s/generation -> every 10
    res["GRPO"] = run("grpo_tiny.yaml", tmp / "grpo", args.budget, args.quantization,
                      ["train.steps=100000", "eval.every=50", "train.optim.schedule=constant",
                       "train.checkpoint_every=0"])
    res["ESSA"] = run("es_tiny.yaml", tmp / "essa", args.budget, args.quantization,
                      ["train.generations=100000", "eval.every=10", "train.checkpoint_every=0"])
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
