"""Peak memory and step time of the preference family on a real-vocabulary model: what skipping the
reference pass (ORPO, SimPO) saves next to DPO, and what TDPO's exact full-vocabulary KL costs.

    .venv/bin/python benchmarks/preference_memory.py                 # Qwen2-style, vocab 151936, 4 layers
    .venv/bin/python benchmarks/preference_memory.py --layers 24 --hidden 896 --steps 3

A Qwen2-style model (the real 151,936-token vocabulary, tied embeddings, random weights: no hub here) and a
character tokenizer are made once; the pairs are random text, ``--prompt`` characters of prompt and
``--completion`` characters of each completion (one token per character, plus EOS). Each setup then runs in
a fresh process with the algorithm's own objective (``lowalign.algorithms.<algo>.objective``, the code a run
uses): one warm-up step, then the peak is reset (CUDA ``reset_peak_memory_stats`` / Linux ``clear_refs``) and
``--steps`` optimizer steps are timed (forward, backward, AdamW). Memory is above the process's level before
the model loaded: CUDA allocated memory on a GPU, RSS on CPU (weights made resident, as on a GPU).

* ``dpo (reference per step)``: the reference pass (adapters off, no grad) runs inside every step;
* ``dpo (precomputed reference)``: lowalign's default: reference log-probs computed once for the whole set
  before training (its one-off cost is the ``setup s`` column), so a step runs only the policy;
* ``orpo``, ``simpo``: no reference at all;
* ``tdpo``: a reference backbone pass plus the fused full-vocabulary KL every step;
* ``kto``: the policy pass, plus no-grad policy and reference passes for the mismatched pairs.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_memory import _memory_now, _peak, _reset_peak, resident  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETUPS = {  # label: (algorithm, train overrides)
    "dpo (reference per step)": ("dpo", ["train.precompute_ref=false"]),
    "dpo (precomputed reference)": ("dpo", ["train.precompute_ref=true"]),
    "orpo": ("orpo", []),
    "simpo": ("simpo", []),
    "tdpo": ("tdpo", []),
    "kto": ("kto", []),
}


def prepare(work: Path, args) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lowalign.tiny import wide_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(work / "model")
    wide_tokenizer(cfg.vocab_size).save_pretrained(work / "model")
    rng = random.Random(0)
    text = lambda n: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))
    pairs = [{"prompt": text(args.prompt), "chosen": text(args.completion), "rejected": text(args.completion)}
             for _ in range(args.batch * (args.steps + 1))]
    (work / "pairs.json").write_text(json.dumps(pairs))


def worker(label: str, work: Path, args) -> dict:
    import importlib
    from types import SimpleNamespace

    from lowalign.algorithms.common import POLICY, make_optimizer
    from lowalign.api import config_from_dict
    from lowalign.bundle import ModelBundle
    from lowalign.config import load_raw
    from lowalign.preference import PreferenceData, pairs_to_feedback

    algo, extra = SETUPS[label]
    cfg = config_from_dict(load_raw(REPO / "recipes" / f"{algo}_tiny.yaml"), [
        f"model.name_or_path={work / 'model'}", f"train.batch_size={args.batch}", "lora.r=16", *extra])
    pairs = json.loads((work / "pairs.json").read_text())
    rows = pairs_to_feedback(pairs) if algo == "kto" else pairs
    n = args.batch
    start = _memory_now()
    t0 = time.time()
    bundle = resident(ModelBundle.load(cfg.model))
    bundle.add_adapter(POLICY, cfg.lora)
    run_dir = Path(tempfile.mkdtemp(dir=work))
    ctx = SimpleNamespace(cfg=cfg, bundle=bundle, run_dir=SimpleNamespace(path=run_dir))
    t1 = time.time()
    obj = importlib.import_module(f"lowalign.algorithms.{algo}").objective(ctx, PreferenceData(rows, []))
    setup_s = time.time() - t1  # DPO's precomputed reference pass over the whole set happens here
    params = bundle.adapter_parameters(POLICY)
    opt, _ = make_optimizer(params, cfg.train.optim, args.steps + 1)
    bundle.base.train()

    def step(i: int) -> float:
        s = time.time()
        idx = list(range(i * n, (i + 1) * n))
        with bundle.use(POLICY):
            out = obj.loss([rows[j] for j in idx], idx)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.time() - s

    step(0)  # warm-up: allocator, optimizer state
    _reset_peak()
    times = [step(i) for i in range(1, args.steps + 1)]
    return {"label": label, "peak_bytes": _peak() - start, "load_s": round(t1 - t0, 1), "setup_s": round(setup_s, 2),
            "step_s": times, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (KTO: rows, 2 per pair)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt characters (= tokens)")
    ap.add_argument("--completion", type=int, default=127, help="completion characters (+ EOS = tokens)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--only", nargs="*", choices=sorted(SETUPS), help="a subset of the setups")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.work), args)))
        return
    shared = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--batch", str(args.batch), "--prompt",
              str(args.prompt), "--completion", str(args.completion), "--steps", str(args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args)
        rows = []
        for label in args.only or SETUPS:
            p = subprocess.run([sys.executable, __file__, "--worker", label, "--work", str(work), *shared],
                               capture_output=True, text=True, cwd=REPO)
            if p.returncode != 0:
                raise SystemExit(f"{label} failed:\n{p.stderr[-3000:]}")
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"  {label}: done", file=sys.stderr)
    ref = next((r for r in rows if r["label"] == "dpo (reference per step)"), rows[0])
    med = lambda r: statistics.median(r["step_s"])
    print(f"Qwen2-style, vocab 151936, hidden {args.hidden}, {args.layers} layers, LoRA r16, {args.batch} pairs x "
          f"({args.prompt} + {args.completion + 1}) tokens, device {rows[0]['device']}, {args.steps} timed steps\n")
    mem = "RSS" if rows[0]["device"] == "cpu" else "CUDA allocated"
    print(f"| setup | peak {mem} in training steps, MiB | vs DPO per-step ref | step s (median) | vs DPO per-step "
          "ref | setup s (before step 1) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / ref['peak_bytes']:.2f}x | "
              f"{med(r):.2f} | {med(r) / med(ref):.2f}x | {r['setup_s']} |")


if __name__ == "__main__":
    main()
