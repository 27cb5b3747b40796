"""Real-size GRPO and DPO on one GPU: peak memory, seconds per step by phase, tokens per second.

    python benchmarks/gpu_memory.py                                     # 0.5B and 1.5B, nf4 and bf16, GRPO and DPO
    python benchmarks/gpu_memory.py --sizes 1.5b --quantizations nf4 --algorithms grpo

Random-weight models with the published Qwen2.5-0.5B / 1.5B configurations (no hub on the GPU machine;
weights don't change speed or memory) and the character-level wide tokenizer (one token per character, so
a 256-character prompt is 256 tokens). Each run is the real command line, ``lowalign run`` on the shipped
GPU recipe with the model, data and length overrides below, in its own process:

* GRPO: ``recipes/grpo_qwen_gsm8k.yaml``, 8 prompts x 8 generations, 256-token prompts, 256-token
  completions (EOS never sampled by the random model: every completion is full length), beta 0.04,
  gradient checkpointing, micro-batch 16.
* DPO: ``recipes/dpo_ultrafeedback.yaml``, batch 8, 512-token prompts + 512-token completions.

With ``--cap-gib G`` each run's caching allocator may hold at most G GiB
(``torch.cuda.set_per_process_memory_fraction``; the CUDA context is outside it): whether a run fits a smaller
card, fragmentation included, rather than what it allocated on a large one.

Two steps each; the table shows the second (the first includes one-off warm-up). Peak memory is the run's
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (summary.json), and "report" is lowalign's
own ``ModelBundle.memory_report`` total (base, adapters, heads) next to ``torch.cuda.memory_allocated`` at
the end of the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_rollout import build_model, prompts  # noqa: E402


def write_data(work: Path) -> tuple[Path, Path]:
    pp, dp = work / "prompts.jsonl", work / "pairs.jsonl"
    with pp.open("w") as f:
        for p in prompts(64, 256, seed=1):
            f.write(json.dumps({"question": p, "answer": "#### 7"}) + "\n")
    ps, cs, rs = prompts(40, 512, seed=2), prompts(40, 512, seed=3), prompts(40, 512, seed=4)
    with dp.open("w") as f:
        for p, c, r in zip(ps, cs, rs):
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")
    return pp, dp


SMOKE = {"grpo": ["train.max_new_tokens=4", "train.prompts_per_step=2", "train.num_generations=2",
                  "train.micro_batch_size=4"],
         "dpo": ["train.batch_size=2", "train.eval_pairs=2", "train.precompute_ref=false"]}


# ``python -c CAPPED G run ...``: lowalign's CLI under an allocator capped at G GiB (a no-op without CUDA)
CAPPED = """import runpy, sys, torch
cap = float(sys.argv.pop(1)) * 2**30
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(0).total_memory))
sys.argv[0] = "lowalign"
runpy.run_module("lowalign", run_name="__main__", alter_sys=True)
"""


def command(algo: str, model: Path, quant: str, data: Path, out: Path) -> list[str]:
    common = [f"model.name_or_path={model}", f"model.quantization={quant}", f"output_dir={out}", "train.steps=2",
              "train.checkpoint_every=0", "data.source=local", f"data.path={data}", "eval.num_examples=0"]
    if algo == "grpo":
        return [sys.executable, "-m", "lowalign", "run", str(REPO / "recipes" / "grpo_qwen_gsm8k.yaml"), *common,
                "data.chat_template=false", "data.prompt_template='{prompt}'", "data.eval_split=null",
                "train.beta=0.04", "train.max_new_tokens=256", "train.prompts_per_step=8",
                "train.num_generations=8"]
    return [sys.executable, "-m", "lowalign", "run", str(REPO / "recipes" / "dpo_ultrafeedback.yaml"), *common,
            "train.batch_size=8", "train.eval_pairs=8", "data.max_prompt_tokens=512"]


def planned(cmd: list[str]) -> int:
    """``lowalign plan``'s estimate of ``max_memory_allocated`` for the run ``cmd`` (from config.json alone)."""
    from lowalign.api import load_config
    from lowalign.planner import plan

    i = cmd.index("run")
    return plan(load_config(cmd[i + 1], cmd[i + 2:]), device="cuda").peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=["0.5b", "1.5b"])
    ap.add_argument("--quantizations", nargs="*", default=["nf4", "none"])
    ap.add_argument("--algorithms", nargs="*", default=["grpo", "dpo"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny lengths: check the commands work (CPU)")
    ap.add_argument("--cap-gib", type=float, default=None, help="cap each run's CUDA allocator at this many GiB")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pp, dp = write_data(work)
        for quant in args.quantizations:
            for size in args.sizes:
                model = build_model(size, work / size)
                for algo in args.algorithms:
                    out = work / f"run-{size}-{quant}-{algo}"
                    cmd = command(algo, model, quant, pp if algo == "grpo" else dp, out)
                    cmd += SMOKE[algo] if args.smoke else []
                    if args.cap_gib:
                        cmd[1:3] = ["-c", CAPPED, str(args.cap_gib)]  # in place of ``-m lowalign``
                    cap = f" (allocator capped at {args.cap_gib} GiB)" if args.cap_gib else ""
                    print(f"# {size} {quant} {algo}: lowalign {' '.join(cmd[cmd.index('run'):])}{cap}",
                          file=sys.stderr, flush=True)
                    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                    if p.returncode != 0:
                        print(p.stderr[-3000:], file=sys.stderr)
                        rows.append({"size": size, "quant": quant, "algo": algo,
                                     "error": (p.stderr.strip().splitlines() or ["failed"])[-1][:160]})
                        continue
                    s = json.loads((out / "summary.json").read_text())
                    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
                    last = [r for r in m if "time/step_s" in r][-1]
                    rows.append({"size": size, "quant": quant, "algo": algo, "summary": s, "last": last,
                                 "plan_bytes": planned(cmd)})
                    print(json.dumps(rows[-1]["last"]), file=sys.stderr, flush=True)
                    if args.json:  # after every run: a time limit still leaves the finished ones
                        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("| model | base | algorithm | peak allocated MiB | plan MiB (plan / measured) | peak reserved MiB | s/step "
          "| generate s | score s | train s | tokens/s | report MiB | allocated at end MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    mib = 2**20
    for r in rows:
        name = f"Qwen2.5-{r['size'].upper()}"
        base = "nf4" if r["quant"] == "nf4" else "bf16"
        if "error" in r:
            print(f"| {name} | {base} | {r['algo']} | failed: {r['error']} |" + " |" * 9)
            continue
        s, m = r["summary"], r["last"]

        def t(k, m=m):
            return f"{m[k]:.2f}" if k in m else "-"

        pl = f"{r['plan_bytes'] / mib:.0f} ({r['plan_bytes'] / s['peak_memory_bytes']:.2f})"
        print(f"| {name} | {base} | {r['algo']} | {s['peak_memory_bytes'] / mib:.0f} | {pl} | "
              f"{s.get('peak_memory_reserved_bytes', 0) / mib:.0f} | {t('time/step_s')} | {t('time/generate_s')} | "
              f"{t('time/score_s')} | {t('time/train_s')} | {m.get('tokens_per_s', '-')} | "
              f"{s['memory']['total'] / mib:.0f} | {s.get('cuda_allocated_bytes', 0) / mib:.0f} |")


if __name__ == "__main__":
    main()
