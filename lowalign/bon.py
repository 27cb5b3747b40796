"""``lowalign bon``: best-of-N sampling with a recipe's model, data and reward sources.

For each prompt, sample N completions from the policy (a trained adapter, or the base), score them with the
recipe's rewards (functions and learned reward adapters, all on the same base), and write the best one per
prompt to JSONL, one line per prompt, as it goes (an interrupted run keeps every finished batch):

    {"prompt", "completion", "reward", "rewards": {source: value}, "n", "mean_reward", ["answer", "correct"]}

The file is SFT data as it stands (``algorithm: sft`` with ``data.path=FILE data.answer_column=completion``):
the data side of RAFT, whose online form is ``algorithm: raft``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def best_of_n(recipe, overrides=(), *, out: str, n: int = 8, adapter: str | None = None, split: str = "train",
              limit: int = 0, batch_size: int = 16, temperature: float | None = None,
              max_new_tokens: int | None = None, quiet: bool = False) -> dict:
    """Write the best of ``n`` samples per prompt to ``out``; returns the summary printed at the end."""
    from rich.console import Console

    from lowalign.api import load_bundle, load_data, resolve_config
    from lowalign.config import ConfigError

    console = Console(stderr=True, quiet=quiet)
    extra = [f"lora.init_from={adapter}"] if adapter else []
    cfg, _ = resolve_config(recipe, [*overrides, *extra])  # validates the recipe and the adapter directory
    if not cfg.rewards:
        raise ConfigError("rewards: best-of-N ranks samples by reward; the recipe has no reward sources")
    if n < 1 or batch_size < 1 or limit < 0:
        raise ConfigError("--n and --batch-size must be >= 1, --limit >= 0")
    if split not in ("train", "eval"):
        raise ConfigError(f"--split must be train or eval, got {split!r}")
    path = Path(out)
    if not path.parent.exists():
        raise ConfigError(f"--out: directory {path.parent} does not exist")
    tc = cfg.train
    temperature = temperature if temperature is not None else getattr(tc, "temperature", 1.0)
    max_new_tokens = max_new_tokens or getattr(tc, "max_new_tokens", None) or cfg.eval.max_new_tokens

    from lowalign.algorithms.common import reward_sources, step_seed
    from lowalign.data import prepare_prompts
    from lowalign.generation import generate
    from lowalign.losses.filtering import best_of_n_mask
    from lowalign.models import load_tokenizer, resolve_path
    from lowalign.rewards import RewardSources, row_columns
    from lowalign.runtime import Progress, seed_everything

    tok = load_tokenizer(resolve_path(cfg.model.name_or_path, cfg.model.gguf_file, console),
                         cfg.model.trust_remote_code)
    data = load_data(cfg, tok)
    if data.pairs is not None:
        raise ConfigError(f"algorithm: best-of-N samples from prompts; '{cfg.algorithm}' reads preference pairs "
                          "(use a prompt recipe)")
    prepare_prompts(data, tok, cfg.data)  # chat templates (the built-in task's too) before rows are taken
    if split == "eval":
        rows = data.eval_rows(limit or len(data.eval_rows_all))
    elif data.task is not None:  # a built-in task generates training prompts
        rows = data.batch(0, limit or 256, cfg.seed)
    else:
        rows = data.train_rows[:limit] if limit else data.train_rows
    if not rows:
        raise ConfigError(f"--split {split}: no prompts to sample")
    RewardSources(cfg.rewards, checker=data.checker).probe(rows[:2])  # a broken reward fails before the model loads
    bundle = load_bundle(cfg, tok, data, console)
    role = "reference"
    if adapter:
        bundle.add_adapter("policy", cfg.lora, init_from=adapter)
        role = "policy"
    rewards = reward_sources(SimpleNamespace(cfg=cfg, bundle=bundle, data=data))
    console.print(f"best-of-{n}: {len(rows)} prompts from the {split} split, "
                  f"{'adapter ' + adapter if adapter else 'the base model'} -> {path}")
    best_sum = mean_sum = 0.0
    n_correct = n_checked = 0
    batches = range(0, len(rows), batch_size)
    with path.open("w") as f, Progress(len(batches), 0, ("best", "mean"), desc="bon", every=1) as bar, \
            bundle.use(role), bundle.eval_mode():
        for b, s in enumerate(batches):
            chunk = rows[s:s + batch_size]
            seed_everything(step_seed(cfg.seed, b))
            roll = generate(bundle, [r["prompt"] for r in chunk], max_new_tokens=max_new_tokens, do_sample=True,
                            temperature=temperature, num_generations=n)
            rb = rewards([r["prompt"] for r in chunk for _ in range(n)], roll.texts, row_columns(chunk, n))
            keep = best_of_n_mask(rb.total, n).nonzero().flatten().tolist()
            for r, i in zip(chunk, keep):
                line = {"prompt": r["prompt"], "completion": roll.texts[i], "reward": float(rb.total[i]),
                        "rewards": {k: float(v[i]) for k, v in rb.parts.items()}, "n": n,
                        "mean_reward": float(rb.total[i - i % n:i - i % n + n].mean())}
                if "answer" in r:
                    line["answer"] = r["answer"]
                    if data.checker is not None:
                        line["correct"] = bool(data.checker(roll.texts[i], r["answer"]))
                        n_correct += line["correct"]
                        n_checked += 1
                f.write(json.dumps(line) + "\n")
                best_sum += line["reward"]
                mean_sum += line["mean_reward"]
            f.flush()
            done = min(s + batch_size, len(rows))
            bar.update(b + 1, {"best": best_sum / done, "mean": mean_sum / done})
    summary = {"prompts": len(rows), "n": n, "best_reward": best_sum / len(rows),
               "mean_reward": mean_sum / len(rows), "out": str(path)}
    if n_checked:
        summary["best_accuracy"] = n_correct / n_checked
    console.print(f"best-of-{n}: mean reward of the best {summary['best_reward']:.4g} vs "
                  f"{summary['mean_reward']:.4g} over all samples; wrote {path}")
    return summary
