"""Is ESSA's plateau on the tiny task the search space or the search? Two measurements on es_tiny's setup.

1. Capacity: train exactly the parameters es_tiny evolves (the singular values s of its rank-r adapter, U and
   V frozen as ESSA sets them) by gradient descent on the supervised loss of the correct answers and print
   held-out greedy accuracy against time. If gradient steps on s climb well past where the ES run stalls,
   the space holds the skill and the search is what limits.
2. Signal: how much of one antithetic pair's fitness difference f(theta + sigma eps) - f(theta - sigma eps)
   is the direction eps and how much the prompts it happened to be scored on. Each of 128 pairs is scored on
   two disjoint sets of 64 training problems; the correlation of the two differences across pairs is the
   share of their variance that the direction explains (1: all slope, 0: all chance), at the sigma es_tiny
   calibrates and at 4x and 16x it.

    .venv/bin/python benchmarks/essa_limits.py [--steps 300] [--lr 0.02] [key=value recipe overrides ...]

Same base, quantization, LoRA rank and subspace as ``recipes/es_tiny.yaml`` (overrides as in ``lowalign
run``); capacity: 64 training problems per step, Adam on s, the 500-problem held-out set of the benchmarks.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--every", type=int, default=50, help="evaluate every N steps")
    ap.add_argument("--pairs", type=int, default=128, help="antithetic pairs for the signal table")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. lora.r=16")
    args = ap.parse_args()

    from es_vs_grpo import essa_bundle  # this folder is on sys.path when run as a script

    from lowalign.algorithms.essa import POLICY
    from lowalign.api import load_config
    from lowalign.evaluation import heldout_eval
    from lowalign.generation import encode_completions
    from lowalign.tasks.arithmetic import ArithmeticTask, is_correct

    cfg = load_config(REPO / "recipes/es_tiny.yaml", args.overrides)
    tc = cfg.train
    b, sv = essa_bundle(cfg)
    theta = sv.initial_theta().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=args.lr)
    task, held = ArithmeticTask(), ArithmeticTask().eval_rows(500)

    def accuracy() -> float:
        with torch.no_grad():
            sv.apply(theta.detach())
            return heldout_eval(b, held, checker=is_correct, role=POLICY)["accuracy"]

    print(f"gradient descent on es_tiny's {theta.numel()} singular values ({cfg.model.name_or_path}, "
          f"{cfg.model.quantization}, LoRA r{cfg.lora.r}, {tc.subspace} subspace), Adam lr {args.lr}, 64 problems "
          f"per step; {torch.get_num_threads()} threads\n")
    print("| step | train time (s) | loss | held-out greedy accuracy |")
    print("|---|---|---|---|")
    print(f"| 0 | 0 | | {accuracy():.3f} |", flush=True)
    train_s = 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        rows = task.train_rows(64, seed=cfg.seed * 100_003 + step)
        batch = encode_completions(b.tokenizer, [r["prompt"] for r in rows], [r["answer"] for r in rows], b.device)
        n = batch.input_ids.shape[0]
        sv.apply_unit()  # B = U / scale; s enters per row, with gradient, through the row scales
        scales = {name: s.expand(n, -1) for (name, *_), s in zip(sv.mods, sv._values(theta[None]))}
        with b.use(POLICY), b.row_scales(POLICY, scales):
            logits = b.causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch.input_ids[:, 1:],
                                                reduction="none")
        mask = batch.target_mask[:, 1:].float()
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        if step % args.every == 0 or step == args.steps:
            print(f"| {step} | {train_s:.0f} | {loss.item():.3f} | {accuracy():.3f} |", flush=True)
    print()
    signal(b, sv, cfg, args.pairs)


def signal(b, sv, cfg, pairs: int) -> None:
    """Correlation across antithetic pairs of their fitness differences on two disjoint prompt sets."""
    from rich.console import Console

    from lowalign.algorithms.essa import calibrate_sigma, member_fitness
    from lowalign.es import noise
    from lowalign.rewards import RewardSources
    from lowalign.tasks.arithmetic import ArithmeticTask

    tc, rewards = cfg.train, RewardSources(cfg.rewards)
    rows = ArithmeticTask().train_rows(128, seed=cfg.seed + 1)
    halves = rows[:64], rows[64:]
    theta = sv.initial_theta()

    sigma0 = calibrate_sigma(b, sv, theta, halves[0], tc, cfg.seed, Console())
    eps = torch.stack([noise(theta.numel(), 10_000 + k) for k in range(pairs)])
    print(f"\nfitness differences of {pairs} antithetic pairs at the start (s = {tc.s_init}), each pair scored on "
          "two disjoint sets of 64 training problems\n")
    print("| sigma | mean abs difference (problems of 64) | correlation between the two sets |")
    print("|---|---|---|")
    for sigma in (sigma0, 4 * sigma0, 16 * sigma0):
        members = torch.stack([theta + sign * sigma * e for e in eps for sign in (1.0, -1.0)])
        diffs = []
        for half in halves:
            f = member_fitness(b, rewards, sv, members, half, tc, seed=cfg.seed).view(pairs, 2)
            diffs.append((f[:, 0] - f[:, 1]).float())
        corr = torch.corrcoef(torch.stack(diffs))[0, 1].item()
        mad = torch.cat(diffs).abs().mean().item() * 64
        print(f"| {sigma:.4g} | {mad:.2f} | {corr:.2f} |", flush=True)


if __name__ == "__main__":
    main()
