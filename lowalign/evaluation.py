"""Held-out evaluation of a prompt task: greedy (and optionally sampled) completions of held-out prompts,
scored by the run's reward sources (mean per source and weighted total) and, where the task has an answer
checker and the rows an ``answer``, by exact accuracy. Always in eval mode, never with gradients."""

from __future__ import annotations

import torch

from lowalign.generation import generate
from lowalign.rewards import row_columns


@torch.no_grad()
def heldout_eval(bundle, rows: list[dict], *, checker=None, rewards=None, batch_size: int = 256,
                 max_new_tokens: int = 8, role: str = "policy", sampled: int = 0, temperature: float = 1.0,
                 n_samples: int = 5) -> dict:
    """Metrics of ``role`` on ``rows``:

    * ``accuracy``: share of greedy completions with ``checker(completion, answer)`` (only with a checker
      and an ``answer`` in every row);
    * ``reward`` and ``reward/<source>``: mean weighted total and mean of each source over the greedy
      completions (only with ``rewards``, a :class:`lowalign.rewards.RewardSources`);
    * ``reward_sampled``: mean total over ``sampled`` completions per prompt at ``temperature``;
    * ``n`` and a few ``samples`` for the log.
    """
    role = role if role in bundle.adapter_configs else "reference"
    use_checker = checker is not None and bool(rows) and all("answer" in r for r in rows)
    texts, sampled_texts = [], []
    with bundle.use(role), bundle.eval_mode():
        for s in range(0, len(rows), batch_size):
            prompts = [r["prompt"] for r in rows[s:s + batch_size]]
            texts += generate(bundle, prompts, max_new_tokens=max_new_tokens, do_sample=False).texts
            if sampled:
                sampled_texts += generate(bundle, prompts, max_new_tokens=max_new_tokens, do_sample=True,
                                          temperature=temperature, num_generations=sampled).texts
    out: dict = {"n": len(rows)}
    correct = [bool(checker(t, r["answer"])) for t, r in zip(texts, rows)] if use_checker else None
    if correct is not None:
        out["accuracy"] = sum(correct) / max(1, len(rows))
    totals = None
    if rewards is not None and rows:
        rb = rewards([r["prompt"] for r in rows], texts, row_columns(rows))
        totals = rb.total
        out["reward"] = round(rb.total.mean().item(), 6)  # a mean of float32 rewards: 6 decimals are all it has
        out.update({f"reward/{k}": round(v.mean().item(), 6) for k, v in rb.parts.items()})
        if sampled:
            rs = rewards([r["prompt"] for r in rows for _ in range(sampled)], sampled_texts, row_columns(rows, sampled))
            out["reward_sampled"] = round(rs.total.mean().item(), 6)
    samples = []
    for i, (r, t) in enumerate(zip(rows[:n_samples], texts)):
        s = {"prompt": r.get("_question", r["prompt"]), "completion": t}
        if "answer" in r:
            s["answer"] = r["answer"]
        if correct is not None:
            s["correct"] = correct[i]
        if totals is not None:
            s["reward"] = float(totals[i])
        samples.append(s)
    out["samples"] = samples
    return out
