"""lowalign next to TRL on the same model, data and settings: peak memory and time per step, side by side.

    .venv/bin/pip install -e '.[bench]' -c constraints.txt     # TRL (the bench extra)
    .venv/bin/python benchmarks/vs_trl.py --quick               # <= 20 min on a 2-core CPU
    .venv/bin/python benchmarks/vs_trl.py --reps 3 --grpo-steps 3 --dpo-steps 8
    .venv/bin/python benchmarks/vs_trl.py --quick --model package:smollm2-135m-instruct --micro-batch 8
    python3 benchmarks/vs_trl.py --quick --device cuda          # a GPU: both in bf16, max_memory_allocated

The model is a random-weight Qwen2 with the real 151,936-token vocabulary (hidden 256, 4 layers, untied
embeddings: a 0.3 GB model whose memory, like a real small model's, is dominated by the vocabulary), saved
once with a character-level WordLevel tokenizer (``lowalign.tiny.wide_tokenizer``). Both tools load that
directory in fp32 with the tokenizer loaded the way ``lowalign.models.load_tokenizer`` does (transformers 5's
``AutoTokenizer`` would swap in an empty ``Qwen2Tokenizer``), LoRA r16 / alpha 32 on every projection,
gradient checkpointing, dropout off, the same learning rate, torch threads and seed.

* GRPO: 8 prompts x 8 generations x 128 new tokens per optimizer step (temperature 1, no top-k/p), beta 0.04
  (both score the reference with adapters off), loss ``dapo``, micro-batches of 16 (TRL:
  ``per_device_train_batch_size=16``, ``gradient_accumulation_steps=4``: one generation of 64 completions per
  optimizer step). The reward is a cheap character count (the same function for both). A random model reaches
  EOS with probability ~1/151936 per token, so completions run to 128 tokens in both (the table shows it).
* DPO: batch 4 pairs of 16-token prompts and 128-token completions, beta 0.1, sigmoid loss. lowalign runs
  twice: its default (reference log-probs precomputed once: ``setup s``) and ``precompute_ref=false`` (the
  reference pass every step, as TRL's default does).

``--model`` runs both tools on a real model instead (a directory, a .gguf, or
``package:smollm2-135m-instruct`` converted once from its GGUF): the same prompts, pairs and settings.
``--chat`` (with ``--model``) sends GRPO's prompts as a user message through the model's chat template, as an
instruct model's users do (lowalign ``data.chat_template: true``, TRL conversational prompts; on SmolLM2 the
template's system prompt makes each prompt ~40 tokens): the prompts the group's completions share.
``--micro-batch N`` sets the GRPO micro-batch (TRL: ``per_device_train_batch_size=N``,
``gradient_accumulation_steps=64/N``) and the DPO batch (N pairs per step) for both tools; a user short of
memory picks the smaller.

Each run is its own process; tools alternate in every repetition. Peak memory is the larger of the peak RSS
the worker's kernel counter reports (``VmHWM``; lowalign's per-phase peaks come from ``--profile-memory``, off by
default: its phase resets slow the phase after them)
and the whole process tree's RSS sampled every 50 ms. Step times are per optimizer step (a TRL callback;
lowalign's ``metrics.jsonl``), the median of the steps after the first, with lowalign's own split into
generation / scoring (rewards, reference and old log-probs) / training (forward, backward, optimizer) and
TRL's from its profiling timers (``transformers.generate`` inside ``_prepare_inputs``). Prints markdown tables:
one row per run, then lowalign / TRL ratios (min / median / max over repetitions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-5


def char_reward(prompts, completions, **_):
    """The benchmark's reward, for both tools: the share of letters among the completion's characters (TRL's
    conversational completions are [{"role": "assistant", "content": ...}])."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.isalpha() for ch in t) / max(1, len(t)) for t in texts]


# ---- the shared inputs -----------------------------------------------------------------------------------


def prepare(work: Path, args) -> None:
    import random

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lowalign.tiny import wide_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(work / "model")
    wide_tokenizer(cfg.vocab_size).save_pretrained(work / "model")
    rnd = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz     "

    def text(n):
        return "".join(rnd.choice(letters) for _ in range(n))

    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": text(16)}) + "\n" for _ in range(256)))
    (work / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": text(16), "chosen": text(128), "rejected": text(128)}) + "\n"
        for _ in range(4 + max(64, (args.dpo_batch or 4) * args.dpo_steps))))


# ---- workers (one process each) ----------------------------------------------------------------------------


DTYPE = {"cpu": "float32", "cuda": "bfloat16"}  # the compute dtype both tools use on each device


def _status(key: str) -> int:
    from lowalign.runtime import proc_status

    return proc_status(key)


def model_dir(work: Path, args) -> str:
    """The model both tools load: ``--model`` (converted once if it is a GGUF) or the random one in ``work``."""
    if args.model is None:
        return str(work / "model")
    from lowalign.models import resolve_path

    return resolve_path(args.model)


def lowalign_worker(algo: str, work: Path, out: Path, args, precompute_ref: bool = True) -> dict:
    from lowalign.api import run

    common = {"seed": 0, "output_dir": str(out), "threads": args.threads,
              "profile_memory": args.profile_memory,
              "model": {"name_or_path": model_dir(work, args), "dtype": DTYPE[args.device],
                        "gradient_checkpointing": True, "device": args.device},
              "lora": {"r": 16, "alpha": 32, "target_modules": TARGETS}, "eval": {"num_examples": 0}}
    if algo == "grpo":
        cfg = {**common, "algorithm": "grpo", "data": {"path": str(work / "prompts.jsonl"), "chat_template": args.chat},
               "rewards": [{"fn": "vs_trl:char_reward"}],
               "train": {"steps": args.grpo_steps, "prompts_per_step": 8, "num_generations": 8,
                         "max_new_tokens": 128, "beta": 0.04, "loss_type": "dapo", "micro_batch_size": args.micro_batch,
                         "checkpoint_every": 0, "log_every": 1, "optim": {"learning_rate": LR}}}
    else:
        cfg = {**common, "algorithm": "dpo", "data": {"path": str(work / "pairs.jsonl")},
               "train": {"steps": args.dpo_steps, "batch_size": args.dpo_batch, "beta": 0.1, "eval_pairs": 4,
                         "precompute_ref": precompute_ref, "checkpoint_every": 0, "log_every": 1,
                         "optim": {"learning_rate": LR}}}
    s = run(cfg, quiet=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [{"step_s": r["time/step_s"], "generate_s": r.get("time/generate_s"), "score_s": r.get("time/score_s"),
              "train_s": r.get("time/train_s"),
              "completion_length": r.get("completion_length")} for r in rows]
    phases = s.get("memory_by_phase") or {}
    cuda = args.device == "cuda"  # summary.json's peak is max_memory_allocated there
    return {"peak_bytes": s["peak_memory_bytes"] if cuda else max(s.get("peak_memory_bytes") or 0, _status("VmHWM")),
            "after_load_bytes": phases["after_load_mib"] * 2**20 if phases else None,
            "steps": steps, "setup_s": s.get("time/objective_setup_s"), "phases_mib": phases.get("peak_mib")}


def trl_worker(algo: str, work: Path, out: Path, args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.extras import profiling

    from lowalign.models import load_tokenizer

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    timers: dict[str, float] = {}

    def log_metrics(self, duration):  # TRL's profiling timers, summed per step
        timers[self.name] = timers.get(self.name, 0.0) + duration

    profiling.ProfilingContext._log_metrics = log_metrics
    steps, marks = [], {}

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            marks["after_load"] = torch.cuda.memory_allocated() if cuda else _status("VmRSS")

        def on_step_begin(self, a, state, control, **kw):
            timers.clear()
            marks["t"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - marks["t"]
            gen = sum(v for k, v in timers.items() if k.endswith("transformers.generate"))
            prep = sum(v for k, v in timers.items() if k.endswith("_prepare_inputs"))
            steps.append({"step_s": round(dt, 3), "generate_s": round(gen, 3) if gen else None,
                          "score_s": round(prep - gen, 3) if prep else None,
                          "train_s": round(dt - prep, 3) if prep else None})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs and steps:
                steps[-1]["completion_length"] = logs["completions/mean_length"]

    tok = load_tokenizer(model_dir(work, args))
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir(work, args), dtype=getattr(torch, DTYPE[args.device]))
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    common = dict(output_dir=str(out), use_cpu=not cuda, bf16=cuda, learning_rate=LR, logging_steps=1, report_to=[],
                  save_strategy="no", gradient_checkpointing=True, seed=0, disable_tqdm=True,
                  dataloader_num_workers=0)
    if algo == "grpo":
        rows = [json.loads(x) for x in (work / "prompts.jsonl").read_text().splitlines()]
        if args.chat:  # conversational: TRL renders them with the chat template, as lowalign does
            rows = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
        cfg = trl.GRPOConfig(**common, max_steps=args.grpo_steps, per_device_train_batch_size=args.micro_batch,
                             gradient_accumulation_steps=64 // args.micro_batch, num_generations=8,
                             max_completion_length=128, beta=0.04, loss_type="dapo", temperature=1.0)
        tr = trl.GRPOTrainer(model=model, reward_funcs=char_reward, args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, peft_config=peft, callbacks=[Timer()])
    else:
        rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()][4:]  # as lowalign: 4 held out
        cfg = trl.DPOConfig(**common, max_steps=args.dpo_steps, per_device_train_batch_size=args.dpo_batch,
                            gradient_accumulation_steps=1, beta=0.1, max_length=None, precompute_ref_log_probs=False)
        tr = trl.DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            peft_config=peft, callbacks=[Timer()])
    tr.train()
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    return {"peak_bytes": peak, "after_load_bytes": marks.get("after_load"), "steps": steps,
            "setup_s": None, "phases_mib": None}


# ---- the driver --------------------------------------------------------------------------------------------


def _tree_rss(proc) -> int:
    try:
        procs = [proc, *proc.children(recursive=True)]
    except Exception:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except Exception:
            pass
    return total


def run_one(setup: str, work: Path, args, rep: int) -> dict:
    import psutil

    out = work / "runs" / f"{setup}-{rep}"
    cmd = [sys.executable, __file__, "--worker", setup, "--work", str(work), "--out", str(out),
           "--threads", str(args.threads), "--grpo-steps", str(args.grpo_steps), "--dpo-steps", str(args.dpo_steps),
           "--micro-batch", str(args.micro_batch), "--dpo-batch", str(args.dpo_batch), "--device", args.device]
    cmd += ["--profile-memory"] if args.profile_memory else []
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--chat"] if args.chat else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    ps, peak, done = psutil.Process(p.pid), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(ps))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = p.communicate()
    done.set()
    th.join()
    if p.returncode != 0:
        raise SystemExit(f"{setup} failed ({p.returncode}):\n{stderr[-4000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    r.update(setup=setup, rep=rep, wall_s=round(time.time() - t0, 1), tree_peak_bytes=peak[0])
    if args.device == "cpu":  # on CUDA the workers report max_memory_allocated; the process tree's RSS is beside it
        r["peak_bytes"] = max(r["peak_bytes"], peak[0])
    print(f"  {setup} rep {rep}: peak {r['peak_bytes'] / 2**20:.0f} MiB, steps "
          f"{[s['step_s'] for s in r['steps']]} s, wall {r['wall_s']} s", file=sys.stderr, flush=True)
    return r


SETUPS = {"grpo": ["lowalign-grpo", "trl-grpo"], "dpo": ["lowalign-dpo", "lowalign-dpo-refstep", "trl-dpo"]}
LABEL = {"lowalign-grpo": ("GRPO", "lowalign"), "trl-grpo": ("GRPO", "TRL"),
         "lowalign-dpo": ("DPO", "lowalign (reference precomputed)"),
         "lowalign-dpo-refstep": ("DPO", "lowalign (reference every step)"), "trl-dpo": ("DPO", "TRL")}


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _steady(steps: list[dict], key: str):
    """Median over the steps after the first (the first pays one-off warm-up), or the only step."""
    return _med([s.get(key) for s in (steps[1:] if len(steps) > 1 else steps)])


def _f(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def report(results: list[dict], args) -> None:
    import platform

    import torch
    import transformers

    try:
        import trl
        trl_v = trl.__version__
    except ImportError:
        trl_v = "not installed"
    import peft

    what = (f"{args.model}" if args.model else
            f"Qwen2-style random weights, vocab 151936, hidden {args.hidden}, {args.layers} layers")
    chat = ", chat prompts" if args.chat else ""
    mem = "peak RSS" if args.device == "cpu" else "max_memory_allocated"
    print(f"\n{what}, {DTYPE[args.device]} on {args.device}, GRPO micro-batch {args.micro_batch}{chat}, "
          f"DPO batch {args.dpo_batch}, LoRA r16 "
          f"on {'/'.join(TARGETS)}, gradient checkpointing, {args.threads} torch threads; {args.reps} rep(s), "
          f"GRPO {args.grpo_steps} steps, DPO {args.dpo_steps} steps. torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}, TRL {trl_v}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.\n")
    print(f"| algorithm | tool | rep | {mem} MiB | after load MiB | s/step (median after the 1st) | all steps s "
          "| generate s | score s | train s | completion tokens | setup s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        algo, tool = LABEL[r["setup"]]
        st = r["steps"]
        print(f"| {algo} | {tool} | {r['rep']} | {r['peak_bytes'] / 2**20:.0f} | "
              f"{_f(r['after_load_bytes'] and r['after_load_bytes'] / 2**20, 0)} | {_f(_steady(st, 'step_s'), 2)} | "
              f"{', '.join(_f(s['step_s'], 1) for s in st)} | {_f(_steady(st, 'generate_s'))} | "
              f"{_f(_steady(st, 'score_s'))} | {_f(_steady(st, 'train_s'))} | {_f(_steady(st, 'completion_length'))} "
              f"| {_f(r['setup_s'])} |")
    print("\nlowalign / TRL (min / median / max over repetitions; below 1 is better):\n")
    print("| comparison | peak memory | seconds per step |")
    print("|---|---|---|")
    by = {(r["setup"], r["rep"]): r for r in results}
    for low, ref in (("lowalign-grpo", "trl-grpo"), ("lowalign-dpo", "trl-dpo"), ("lowalign-dpo-refstep", "trl-dpo")):
        mem, spd = [], []
        for rep in range(args.reps):
            a, b = by.get((low, rep)), by.get((ref, rep))
            if a and b:
                mem.append(a["peak_bytes"] / b["peak_bytes"])
                spd.append(_steady(a["steps"], "step_s") / _steady(b["steps"], "step_s"))
        if mem:
            def mmm(xs):
                return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}"
            print(f"| {LABEL[low][0]}: {LABEL[low][1]} vs TRL | {mmm(mem)} | {mmm(spd)} |")
    phases = [r for r in results if r["phases_mib"]]
    if phases:
        print("\nWhere lowalign's memory goes (peak RSS in each phase, MiB, first repetition; CPU RSS includes "
              "everything the allocator kept from earlier phases):\n")
        for r in phases:
            if r["rep"] == 0:
                ph = ", ".join(f"{k} {v:.0f}" for k, v in r["phases_mib"].items())
                print(f"* {LABEL[r['setup']][1]} {LABEL[r['setup']][0]}: {ph}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, GRPO 2 steps, DPO 4 steps (<= 20 min)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--dpo-steps", type=int, default=8)
    ap.add_argument("--only", choices=["grpo", "dpo"], help="one algorithm")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--model", default=None, help="a real model (directory, .gguf, package:...) instead of the "
                                                  "random 152k-vocabulary one")
    ap.add_argument("--chat", action="store_true", help="GRPO prompts through the model's chat template "
                                                          "(needs --model)")
    ap.add_argument("--micro-batch", type=int, default=16, choices=[1, 2, 4, 8, 16, 32, 64],
                    help="GRPO micro-batch for both tools (64 completions per step)")
    ap.add_argument("--dpo-batch", type=int, default=None, help="DPO pairs per step (default: 4)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: both tools on the GPU in bf16, peak = torch.cuda.max_memory_allocated")
    ap.add_argument("--json", help="also write every run's numbers to this file")
    ap.add_argument("--profile-memory", action="store_true",
                    help="lowalign's per-phase peaks (its phase resets hand the heap back to the OS, which slows "
                         "the next phase: step times are then not comparable)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        tool, algo = args.worker.split("-")[:2]
        work, out = Path(args.work), Path(args.out)
        if tool == "lowalign":
            r = lowalign_worker(algo, work, out, args, precompute_ref=not args.worker.endswith("refstep"))
        else:
            r = trl_worker(algo, work, out, args)
        print(json.dumps(r))
        return
    if args.chat and not args.model:
        ap.error("--chat needs --model: the random model's tokenizer has no chat template")
    if args.dpo_batch is None:
        args.dpo_batch = 4
    if args.quick:
        args.reps, args.grpo_steps, args.dpo_steps = 1, 2, 4
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: .venv/bin/pip install -e '.[bench]' -c constraints.txt") from None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args)
        if args.model:
            model_dir(work, args)  # convert a GGUF once, before the workers
        for rep in range(args.reps):
            for algo in ([args.only] if args.only else ["dpo", "grpo"]):
                order = SETUPS[algo] if rep % 2 == 0 else SETUPS[algo][::-1]  # alternate who goes first
                for setup in order:
                    results.append(run_one(setup, work, args, rep))
    results.sort(key=lambda r: (r["setup"].split("-")[1], r["rep"], r["setup"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    report(results, args)


if __name__ == "__main__":
    main()
