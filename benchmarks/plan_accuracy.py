"""How close is `lowalign plan` to what a run really uses? Estimates next to measured peaks.

    .venv/bin/python benchmarks/plan_accuracy.py                 # every setup below, CPU
    .venv/bin/python benchmarks/plan_accuracy.py --only grpo-152k dpo-152k

Each setup is a recipe plus overrides, run for real (``lowalign run``, its own process, a couple of steps) on
the built-in tiny model and on a random-weight Qwen2 with the real 151,936-token vocabulary (hidden 128,
2 layers, untied head: built here, no hub). The measured peak is ``summary.json``'s ``peak_memory_bytes``
(peak RSS of the process on CPU; ``torch.cuda.max_memory_allocated`` on a GPU); the estimate is
``lowalign.planner.plan`` of the same resolved config for the same device, from config.json alone. Prints a
markdown table with estimate / measured; exits 1 when a setup is off by more than ``--tolerance``
(default 25%). ``tests/test_planner.py`` runs a subset of the same setups.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the setups name benchmarks.vs_trl:char_reward
BIG = "{work}/qwen152k"  # the 152k-vocabulary model directory
SETUPS = {  # name: (recipe, overrides); {work} is the scratch directory
    "grpo-tiny": ("grpo_tiny", ["train.steps=2", "eval.num_examples=64"]),
    "dpo-tiny": ("dpo_tiny", ["train.steps=2", "data.num_pairs=64", "train.eval_pairs=16"]),
    "rm-tiny": ("rm_tiny", ["train.steps=2", "data.num_pairs=64", "train.eval_pairs=16"]),
    "essa-tiny": ("es_tiny", ["train.generations=1", "eval.num_examples=64"]),
    "grpo-152k": ("grpo_tiny", [f"model.name_or_path={BIG}", "data.path={work}/prompts.jsonl",
                                "rewards=[{fn: 'benchmarks.vs_trl:char_reward'}]", "train.steps=2",
                                "train.prompts_per_step=4", "train.num_generations=8", "train.max_new_tokens=48",
                                "train.beta=0.04", "eval.num_examples=8", "eval.max_new_tokens=16",
                                "model.gradient_checkpointing=true"]),
    "grpo-152k-nockpt": ("grpo_tiny", [f"model.name_or_path={BIG}", "data.path={work}/prompts.jsonl",
                                       "rewards=[{fn: 'benchmarks.vs_trl:char_reward'}]", "train.steps=2",
                                       "train.prompts_per_step=8", "train.num_generations=8",
                                       "train.max_new_tokens=64", "train.micro_batch_size=16",
                                       "eval.num_examples=8", "eval.max_new_tokens=16"]),
    "dpo-152k": ("dpo_tiny", [f"model.name_or_path={BIG}", "data.path={work}/pairs.jsonl", "train.steps=2",
                              "train.batch_size=4", "train.eval_pairs=4", "model.gradient_checkpointing=true"]),
    "rm-152k": ("rm_tiny", [f"model.name_or_path={BIG}", "data.path={work}/pairs.jsonl", "train.steps=2",
                            "train.batch_size=8", "train.eval_pairs=4"]),
    "essa-152k": ("es_tiny", [f"model.name_or_path={BIG}", "data.path={work}/prompts.jsonl",
                              "rewards=[{fn: 'benchmarks.vs_trl:char_reward'}]", "train.generations=1",
                              "train.population_size=8", "train.prompts_per_generation=16",
                              "train.max_new_tokens=32", "eval.num_examples=8", "eval.max_new_tokens=16"]),
}


def prepare(work: Path) -> None:
    """The 152k-vocabulary model and its local data (prompts; pairs of 16 + 96 characters)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lowalign.tiny import wide_tokenizer

    if (work / "qwen152k" / "config.json").exists():
        return
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(work / "qwen152k")
    wide_tokenizer(cfg.vocab_size).save_pretrained(work / "qwen152k")
    rnd = random.Random(0)

    def text(n):
        return "".join(rnd.choice("abcdefghij klmnopqrstuvwxyz") for _ in range(n))

    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": text(16)}) + "\n" for _ in range(200)))
    (work / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": text(16), "chosen": text(96), "rejected": text(96)}) + "\n" for _ in range(40)))


def overrides(name: str, work: Path) -> tuple[Path, list[str]]:
    recipe, ov = SETUPS[name]
    return REPO / "recipes" / f"{recipe}.yaml", [o.replace("{work}", str(work)) for o in ov]


def measure(name: str, work: Path) -> int:
    """Run the setup for real; its peak (bytes) from summary.json."""
    recipe, ov = overrides(name, work)
    out = work / "runs" / name
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "lowalign", "run", str(recipe), *ov, f"output_dir={out}",
                        "train.checkpoint_every=0"], capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["peak_memory_bytes"]


def estimate(name: str, work: Path, device: str):
    from lowalign.api import load_config
    from lowalign.planner import plan

    recipe, ov = overrides(name, work)
    return plan(load_config(recipe, ov), device=device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(SETUPS))
    ap.add_argument("--tolerance", type=float, default=0.25)
    ap.add_argument("--work", help="scratch directory to keep (default: a temporary one)")
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, bad = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepare(work)
        for name in args.only or SETUPS:
            p = estimate(name, work, device)
            measured = measure(name, work)
            ratio = p.peak / measured
            bad += abs(ratio - 1) > args.tolerance
            rows.append((name, p, measured, ratio))
            print(f"  {name}: estimate {p.peak / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB", file=sys.stderr,
                  flush=True)
    what = "peak RSS" if device == "cpu" else "max_memory_allocated"
    print(f"\n`lowalign plan` vs measured ({what}, {device}; within +-{args.tolerance:.0%} passes):\n")
    print("| setup | estimate MiB | measured MiB | estimate / measured | largest phase (estimate) |")
    print("|---|---|---|---|---|")
    for name, p, m, r in rows:
        top = p.peak_phase
        print(f"| {name} | {p.peak / 2**20:.0f} | {m / 2**20:.0f} | {r:.2f} | {top[0]} {top[1] / 2**20:.0f} MiB |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
