"""Sampling built-in preference pairs on a real model: sequences per generate call vs time and peak memory.

    .venv/bin/python benchmarks/bench_pair_sampling.py                          # SmolLM2, 128 prompts x 4
    .venv/bin/python benchmarks/bench_pair_sampling.py --rows 512 128 --prompts 128 --samples 4

Each setting runs ``preference.onpolicy_pairs`` (chat prompts of the arithmetic task, the number checker) in a
fresh process; peak = ru_maxrss of that process (the model loaded included). Prints a markdown table. This is
what set ``preference.SAMPLE_ROWS_PER_CALL``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def worker(model: str, prompts: int, samples: int, rows: int, tokens: int) -> dict:
    from lowalign.api import config_from_dict
    from lowalign.bundle import ModelBundle
    from lowalign.preference import onpolicy_pairs, task_rows
    from lowalign.tasks.answers import final_number_match
    from lowalign.tasks.arithmetic import ArithmeticTask

    cfg = config_from_dict({"algorithm": "dpo", "model": {"name_or_path": model}})
    b = ModelBundle.load(cfg.model)
    b.add_adapter("policy", cfg.lora)
    tok = b.tokenizer

    def render(q):
        return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)

    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.time()
    pairs = onpolicy_pairs(b, task_rows(ArithmeticTask(question=True), prompts, 0, render), samples, tokens, 0,
                           "policy", rows_per_call=rows, checker=final_number_match)
    return {"rows": rows, "pairs": len(pairs), "seconds": round(time.time() - t, 1), "loaded_mib": round(loaded),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="package:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 128], help="sequences per generate call")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        print(json.dumps(worker(a.model, a.prompts, a.samples, a.worker, a.tokens)))
        return
    print(f"{a.model}: {a.prompts} chat prompts x {a.samples} samples x {a.tokens} tokens\n")
    print("| sequences per call | pairs | seconds | peak RSS MiB | after load MiB |\n|---|---|---|---|---|")
    for rows in a.rows:
        out = subprocess.run([sys.executable, __file__, "--model", a.model, "--prompts", str(a.prompts),
                              "--samples", str(a.samples), "--tokens", str(a.tokens), "--worker", str(rows)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"| {rows} | {r['pairs']} | {r['seconds']} | {r['peak_mib']} | {r['loaded_mib']} |", flush=True)


if __name__ == "__main__":
    main()
