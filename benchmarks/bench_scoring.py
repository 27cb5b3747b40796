"""GRPO's no-gradient scoring (reference and old log-probs) on a real model: every row whole against each
prompt once per group.

    python benchmarks/bench_scoring.py --model package:smollm2-135m-instruct
    python benchmarks/bench_scoring.py --model package:smollm2-135m-instruct --new-tokens 128

One rollout of ``--prompts`` of the built-in arithmetic task's chat prompts x ``--generations`` completions of
``--new-tokens`` sampled tokens (EOS suppressed: every row is full length) under an r16 policy LoRA, then the
reference role's completion log-probs (``lowalign.algorithms.grpo.completion_logprobs``) two ways, alternating,
``--reps`` times each: ``whole`` (``groups=1``: the backbone on every row's prompt and completion) and
``shared`` (``groups=G``: each prompt's forward once, the completions on its cached keys and values). Prints a
markdown table: median seconds, the ratio, and the largest log-prob difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="package:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from bench_rollout import chat_prompts, load_policy

    from lowalign.algorithms.grpo import completion_logprobs
    from lowalign.generation import generate, row_seed
    from lowalign.models import resolve_path

    torch.set_num_threads(torch.get_num_threads())
    b = load_policy(Path(resolve_path(args.model)), "none")
    G = args.generations
    texts = chat_prompts(args.model, args.prompts)
    with b.use("policy"):
        roll = generate(b, texts, max_new_tokens=args.new_tokens, num_generations=G, min_new_tokens=args.new_tokens,
                        row_seeds=[row_seed(0, i) for i in range(args.prompts * G)])
    P, C = roll.prompt_ids.shape[1], roll.completion_ids.shape[1]
    times: dict[str, list[float]] = {"whole": [], "shared": []}
    out = {}
    with torch.no_grad(), b.use("reference"):
        completion_logprobs(b, roll, groups=G)  # warm-up
        for _ in range(args.reps):
            for name, groups in (("whole", 1), ("shared", G)):
                t0 = time.perf_counter()
                out[name], _ = completion_logprobs(b, roll, groups=groups)
                times[name].append(time.perf_counter() - t0)
    whole, shared = (statistics.median(times[k]) for k in ("whole", "shared"))
    diff = (out["whole"] - out["shared"]).abs().max().item()
    print(f"\n{args.prompts} prompts x {G} completions, prompt {P} tokens (padded), completion {C} tokens, "
          f"{torch.get_num_threads()} threads, median of {args.reps}\n")
    print("| scoring | s | vs whole | max log-prob difference |")
    print("|---|---|---|---|")
    print(f"| whole rows | {whole:.2f} | 1.00x | - |")
    print(f"| shared prompt | {shared:.2f} | {shared / whole:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
