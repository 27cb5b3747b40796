"""Held-out accuracy of a run's adapter model next to its exports, each loaded back as lowalign loads a base.

    python benchmarks/export_accuracy.py runs/grpo_smollm2 --types q8_0 f16 merged

For each type: `lowalign.export` writes the file (a GGUF of that type, or the merged f32 directory), then a
fresh bundle loads it the way `lowalign run model.name_or_path=<file>` would (a GGUF is converted once by
transformers' reader, its tokenizer and chat template included) and evaluates greedy completions of the run's
held-out prompts with the run's checker, next to the adapter model (base + the run's policy adapter). Prints a
table: type, file size, export seconds, accuracy and its difference from the adapter model's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _accuracy(cfg, model_cfg, adapter: Path | None, n: int) -> float:
    from lowalign.api import load_data
    from lowalign.bundle import ModelBundle, saved_lora_config
    from lowalign.data import prepare_prompts
    from lowalign.evaluation import heldout_eval

    bundle = ModelBundle.load(model_cfg)
    role = "reference"
    if adapter is not None:
        bundle.add_adapter("policy", saved_lora_config(adapter), init_from=str(adapter))
        role = "policy"
    data = load_data(cfg, bundle.tokenizer)
    prepare_prompts(data, bundle.tokenizer, cfg.data)  # the chat template of the tokenizer this model came with
    out = heldout_eval(bundle, data.eval_rows(n), checker=data.checker, batch_size=cfg.eval.batch_size,
                       max_new_tokens=cfg.eval.max_new_tokens, role=role)
    return out["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--types", nargs="+", default=["q8_0"], help="GGUF types (f32 f16 bf16 q8_0 ...) or merged")
    ap.add_argument("--num-examples", type=int, default=None, help="held-out prompts (default: the run's eval)")
    ap.add_argument("--out-dir", default=None, help="where the exports go (default: a temporary folder)")
    args = ap.parse_args()

    from lowalign import config as C
    from lowalign.api import config_from_dict
    from lowalign.exporter import FLOATS, export

    run = Path(args.run_dir)
    cfg = config_from_dict(C.load_raw(run / "config.yaml"))
    n = args.num_examples or cfg.eval.num_examples
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="lowalign-export-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base_acc = _accuracy(cfg, cfg.model, run / "adapters" / "policy", n)
    rows = [("adapter model", "-", "-", f"{time.time() - t0:.0f}", f"{base_acc:.3f}", "")]
    for t in args.types:
        target = out_dir / ("merged" if t == "merged" else f"{t}.gguf")
        t0 = time.time()
        if t == "merged":
            export(run, target, overwrite=True)
        else:
            export(run, target, format="gguf", overwrite=True,
                   **({"dtype": t} if t in FLOATS else {"quant": t}))
        took = time.time() - t0
        size = target.stat().st_size if target.is_file() else sum(f.stat().st_size for f in target.rglob("*"))
        m = dataclasses.replace(cfg.model, name_or_path=str(target), gguf_file=None, quantization="none")
        t1 = time.time()
        acc = _accuracy(cfg, m, None, n)
        rows.append((t, f"{size / 2**20:.1f}", f"{took:.0f}", f"{time.time() - t1:.0f}", f"{acc:.3f}",
                     f"{100 * (acc - base_acc):+.1f}"))
    print(f"\nrun {run} ({cfg.model.name_or_path}), {n} held-out prompts, greedy, checker: the run's\n")
    print("| model | size MiB | export s | load+eval s | accuracy | vs adapter (points) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
