"""Write the rating file of the multi-objective recipes: arithmetic prompts from the built-in task's
training split, each with the right answer, a near miss, a rambling, a cut-short and an empty answer and four
completions sampled from the built-in tiny model (the distribution a policy starts from), scored for
correctness, format and length. Seeded: the shipped file is this script's output on the development machine.

    python scripts/make_rating_file.py                                  # recipes/data/arith_ratings.jsonl
    python scripts/make_rating_file.py --prompts 2000 --out my_ratings.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowalign.preference import rating_rows
from lowalign.tasks.arithmetic import ArithmeticTask

DEFAULT = Path(__file__).resolve().parents[1] / "recipes" / "data" / "arith_ratings.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT))
    ap.add_argument("--prompts", type=int, default=400, help="prompts (5 + samples rated completions each)")
    ap.add_argument("--samples", type=int, default=4, help="model samples per prompt (0: no model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bundle = None
    if args.samples:
        from lowalign.bundle import ModelBundle
        from lowalign.config import ModelConfig

        bundle = ModelBundle.load(ModelConfig(name_or_path="builtin:tiny", quantization="none"))
    rows = rating_rows(ArithmeticTask(), args.prompts, args.seed, bundle=bundle, samples=args.samples)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rated completions to {args.out}")


if __name__ == "__main__":
    main()
