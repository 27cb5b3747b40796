"""`lowalign run | validate | plan | bon | report | export | ls | cp`: the command-line recipe runner."""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
    for cand in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if cand.exists():
            return cand
    return p  # let the loader report it


def _list_recipes() -> list[tuple[str, str]]:
    import yaml

    out = []
    for f in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            desc = (yaml.safe_load(f.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(invalid YAML)"
        out.append((f.stem, desc))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lowalign", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a recipe (or resume a run directory)")
    r.add_argument("recipe")
    r.add_argument("overrides", nargs="*", help="key.sub=value")
    r.add_argument("--profile-memory", action="store_true",
                   help="log each phase's peak memory (memory/<phase>_mib; summary.json memory_by_phase)")
    v = sub.add_parser("validate", help="check a recipe without loading any model")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*")
    b = sub.add_parser("bon", help="best-of-N: sample N per prompt, keep the best by the recipe's rewards, "
                                   "write JSONL")
    b.add_argument("recipe")
    b.add_argument("overrides", nargs="*", help="key.sub=value")
    b.add_argument("--out", required=True, help="JSONL file to write (one line per prompt)")
    b.add_argument("--n", type=int, default=8, help="samples per prompt")
    b.add_argument("--adapter", default=None, help="trained policy adapter directory (default: the base model)")
    b.add_argument("--split", default="train", choices=["train", "eval"], help="which prompts")
    b.add_argument("--limit", type=int, default=0, help="at most this many prompts (0: all; built-in task: 256)")
    b.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    b.add_argument("--temperature", type=float, default=None, help="default: the recipe's train.temperature")
    b.add_argument("--max-new-tokens", type=int, default=None, help="default: the recipe's")
    pl = sub.add_parser("plan", help="estimate a recipe's peak memory from config.json (no weights loaded) and "
                                     "whether it fits a GPU")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="key.sub=value")
    pl.add_argument("--gpu-memory", default=None, help="the card's memory, e.g. 8GB or 24GiB: prints a verdict and "
                                                       "changes that make the recipe fit")
    pl.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="plan for this device (default cuda)")
    pl.add_argument("--completion-tokens", type=int, default=None,
                    help="completion length for preference data when it cannot be measured")
    pl.add_argument("--nproc", type=int, default=1, help="processes of a torchrun --nproc_per_node run: each "
                                                          "holds the model and its share of the batch (default 1)")
    pl.add_argument("--json", action="store_true", help="print the estimate as JSON")
    rp = sub.add_parser("report", help="PNG plots and report.md of one run directory, or several overlaid")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rp.add_argument("--out", default=None, help="folder to write (default: RUN_DIR/report for one run, "
                                                "runs/compare-<time> for several)")
    rp.add_argument("--samples", type=int, default=5, help="sample completions shown per run")
    ex = sub.add_parser("export", help="a run's policy merged into its base: a transformers directory or a GGUF file")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or one of its checkpoints/step_*)")
    ex.add_argument("--out", required=True, help="directory (merged) or .gguf file (gguf) to write")
    ex.add_argument("--format", default="merged", choices=["merged", "gguf"],
                    help="merged: safetensors + config + tokenizer for from_pretrained; gguf: one file for "
                         "llama.cpp, Ollama, LM Studio (default merged)")
    ex.add_argument("--dtype", default=None, choices=["f32", "f16", "bf16"],
                    help="float type of the weights (default: the source's)")
    ex.add_argument("--quant", default=None, help="gguf only: q8_0, q5_1, q5_0, q4_1 or q4_0 for the matrices "
                                                  "(default: the source GGUF's type)")
    ex.add_argument("--role", default="policy", help="which adapter of the run (reward, value: merged, with the "
                                                     "head file beside it)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output (an earlier export)")
    sub.add_parser("ls", help="list the built-in recipes")
    c = sub.add_parser("cp", help="copy a built-in recipe to edit it")
    c.add_argument("name")
    c.add_argument("dest")
    args, rest = ap.parse_known_args(argv)
    if rest and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in rest)):
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:  # key=value overrides after an option (`lowalign bon R --n 4 train.top_k=5`)
        args.overrides += rest
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

    from lowalign.config import ConfigError

    try:
        if args.cmd == "ls":
            for name, desc in _list_recipes():
                print(f"{name:<20} {desc}")
            return 0
        if args.cmd == "cp":
            src = recipe_path(args.name)
            if not src.exists():
                names = [n for n, _ in _list_recipes()]
                raise ConfigError(f"no recipe named '{args.name}'; have: {', '.join(names)}")
            dest = Path(args.dest)
            if dest.is_dir():
                dest = dest / src.name
            shutil.copyfile(src, dest)
            print(f"copied {src} -> {dest}")
            return 0
        if args.cmd == "validate":
            from lowalign.api import resolve_config

            cfg, _ = resolve_config(recipe_path(args.recipe), args.overrides)
            targets = cfg.lora.target_modules
            note = (f", LoRA on {targets}" if isinstance(targets, list)
                    else " (config.json not in the local cache: the model checks run when it loads)")
            print(f"ok: {args.recipe} ({cfg.algorithm}, model {cfg.model.name_or_path}{note})")
            return 0
        if args.cmd == "plan":
            return _plan(args)
        if args.cmd == "report":
            from lowalign.report import write_report

            print(f"report: {write_report(args.run_dirs, args.out, args.samples)}")
            return 0
        if args.cmd == "export":
            from lowalign.exporter import export

            export(args.run_dir, args.out, format=args.format, dtype=args.dtype, quant=args.quant, role=args.role,
                   overwrite=args.overwrite)
            return 0
        if args.cmd == "bon":
            from lowalign.bon import best_of_n

            best_of_n(recipe_path(args.recipe), args.overrides, out=args.out, n=args.n, adapter=args.adapter,
                      split=args.split, limit=args.limit, batch_size=args.batch_size, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens)
            return 0
        from lowalign.api import run

        run(recipe_path(args.recipe), args.overrides + (["profile_memory=true"] if args.profile_memory else []))
        return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (where it stopped, how to resume), the shell's code 130
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import errno

        from lowalign.data import DataError
        from lowalign.exporter import ExportError
        from lowalign.report import ReportError
        from lowalign.rewards import RewardError
        from lowalign.runtime import CheckpointError, RunLockedError

        if isinstance(e, (DataError, RewardError, CheckpointError, RunLockedError, ReportError, ExportError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            print(f"error: {e.strerror} writing {e.filename or 'the run directory'} ({e})", file=sys.stderr)
            return 2
        raise


def _plan(args) -> int:
    import json

    from lowalign.api import check_world, resolve_config
    from lowalign.config import ConfigError
    from lowalign.planner import parse_size, plan, render, suggestions

    budget = parse_size(args.gpu_memory) if args.gpu_memory else None  # a bad size fails before anything else
    cfg, _ = resolve_config(recipe_path(args.recipe), args.overrides)
    if args.nproc < 1:
        raise ConfigError(f"--nproc: {args.nproc} processes (must be >= 1)")
    check_world(cfg, args.nproc)  # a batch that does not split is refused as torchrun would refuse it
    p = plan(cfg, device=args.device, completion=args.completion_tokens, world=args.nproc)
    fixes = (suggestions(cfg, budget, args.device, args.completion_tokens, world=args.nproc)
             if budget and p.on_card > budget else None)
    if args.json:
        print(json.dumps({"peak_bytes": p.peak, "on_card_bytes": p.on_card, "device": p.device,
                          "static": {n: b for n, b, _ in p.static}, "phases": {n: b for n, b, _ in p.phases},
                          "largest_phase": p.peak_phase[0], "fits": None if budget is None else p.on_card <= budget,
                          "fixes": fixes, "notes": p.notes}, indent=1))
    else:
        print(render(p, budget, fixes))
    return 0 if budget is None or p.on_card <= budget else 1


if __name__ == "__main__":
    raise SystemExit(main())
