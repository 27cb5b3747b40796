"""Held-out greedy accuracy."""

from __future__ import annotations

import torch

from lowalign.generation import generate


@torch.no_grad()
def greedy_accuracy(bundle, rows: list[dict], checker, *, batch_size: int = 256, max_new_tokens: int = 8,
                    role: str = "policy", n_samples: int = 5) -> dict:
    """Greedy-decode every row's prompt in ``role`` and check it with ``checker(completion, answer)``."""
    role = role if role in bundle.adapter_configs else "reference"
    correct, samples = 0, []
    with bundle.use(role):
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            roll = generate(bundle, [r["prompt"] for r in chunk], max_new_tokens=max_new_tokens, do_sample=False)
            for r, text in zip(chunk, roll.texts):
                ok = checker(text, r["answer"])
                correct += ok
                if len(samples) < n_samples:
                    samples.append({"prompt": r["prompt"], "completion": text, "answer": r["answer"],
                                    "correct": bool(ok)})
    return {"accuracy": correct / max(1, len(rows)), "n": len(rows), "samples": samples}
