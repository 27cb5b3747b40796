"""Preference data: pairs ``{prompt, chosen, rejected}`` (DPO and its family, reward models), unpaired
feedback ``{prompt, completion, label}`` (KTO) and ratings ``{prompt, completion, <score columns>}``
(multi-attribute reward models).

Sources:
* local JSONL/JSON/parquet files or hub datasets, with string columns or conversational columns (lists
  of ``{role, content}`` messages, rendered with the tokenizer's chat template when it has one);
* built-in sets from the arithmetic task, so everything runs offline:
  - ``correctness``: the right answer vs a plausible mistake (off by one or ten, a dropped carry,
    swapped digits, a stray suffix);
  - ``onpolicy``: completions sampled from the current model, ranked by the task reward (a correct one,
    or the reference answer when none was, vs the model's own wrong one);
  - ``mixed``: half of each;
  - a rating file (``rating_rows``, written by ``scripts/make_rating_file.py``): the right answer and
    near misses per prompt, each scored for correctness, format and length.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from lowalign.config import ConfigError
from lowalign.data import DataError, _read_table, limit_prompt_lengths, render_rows
from lowalign.tasks.arithmetic import ArithmeticTask, format_reward, is_correct, length_reward


@dataclass
class PreferenceData:
    train: list[dict]
    eval: list[dict]


# ---- built-in pairs from the arithmetic task -----------------------------------------------------


def near_miss(answer: str, a: int, b: int, rng: random.Random) -> str:
    """A plausible wrong answer to ``a + b`` (never the right one)."""
    n = int(answer)
    cands = [n + 1, n - 1, n + 10, n - 10, n + 2]
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:03d}", f"{b:03d}")))
    cands.append(no_carry)
    if len(answer) > 1:
        cands.append(int(answer[::-1]))
    text = str(rng.choice([c for c in cands if c != n and c >= 0] or [n + 1]))
    if rng.random() < 0.1:  # occasionally a format slip, so format/length attributes vary too
        text = rng.choice([text + " ", text + text[-1], text + "?"])
    return text


_PROBLEM_RE = re.compile(r"(\d+)\s*[-+*]\s*(\d+)")


def _operands(row: dict) -> tuple[int, int]:
    """The operands of a task row's problem, in either form ("Q: 47+38= A:" or the chat question, whose
    plain text a rendered row keeps as ``_question``)."""
    text = row.get("_question", row["prompt"])
    m = _PROBLEM_RE.search(text)
    if m is None:
        raise ValueError(f"not an arithmetic problem: {text!r}")
    return int(m.group(1)), int(m.group(2))


def task_rows(task: ArithmeticTask, n: int, seed: int, render=None) -> list[dict]:
    """``n`` training rows of the task, through the run's chat template when it has one (``render``)."""
    return render_rows(task.train_rows(n, seed=seed), render)


def correctness_pairs(task: ArithmeticTask, n: int, seed: int, rows: list[dict] | None = None,
                      render=None) -> list[dict]:
    rng = random.Random(seed)
    rows = rows or task_rows(task, n, seed, render)
    out = []
    for r in rows:
        a, b = _operands(r)
        out.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": near_miss(r["answer"], a, b, rng),
                    "answer": r["answer"], "source": "near_miss"})
    return out


# Sequences per generate call when sampling built-in pairs or ratings. SmolLM2-135M on a 2-core CPU, 128 prompts
# x 4 samples x 16 tokens: 512 per call peaked at 3036 MiB RSS in 109 s, 128 per call at 2023 MiB in 94 s.
SAMPLE_ROWS_PER_CALL = 128


@torch.no_grad()
def onpolicy_pairs(bundle, rows: list[dict], samples: int, max_new_tokens: int, seed: int, role: str,
                   rows_per_call: int = SAMPLE_ROWS_PER_CALL, checker=None) -> list[dict]:
    """Sample ``samples`` completions per prompt in ``role``, ``rows_per_call`` sequences per generate call;
    pair a correct one (or the reference answer) with the model's own wrong one, as ``checker`` (the run's
    answer checker; default exact match) judges. Prompts the model always gets right give no pair."""
    from lowalign.generation import generate

    check = checker or is_correct
    torch.manual_seed(seed)
    rng = random.Random(seed)
    out = []
    with bundle.use(role):
        per_call = max(1, rows_per_call // samples)
        for s in range(0, len(rows), per_call):
            chunk = rows[s:s + per_call]
            roll = generate(bundle, [r["prompt"] for r in chunk], max_new_tokens=max_new_tokens, do_sample=True,
                            temperature=1.0, num_generations=samples)
            for i, r in enumerate(chunk):
                texts = roll.texts[i * samples:(i + 1) * samples]
                good = [t for t in texts if check(t, r["answer"])]
                bad = [t for t in texts if not check(t, r["answer"]) and t.strip()]
                if bad:
                    out.append({"prompt": r["prompt"], "chosen": rng.choice(good) if good else r["answer"],
                                "rejected": rng.choice(bad), "answer": r["answer"], "source": "onpolicy"})
    return out


def builtin_pairs(kind: str, task: ArithmeticTask, n: int, seed: int, bundle=None, samples: int = 4,
                  max_new_tokens: int = 6, role: str = "reference", render=None, checker=None) -> list[dict]:
    """``n`` pairs of ``kind`` from the task; ``render``: the run's chat template (prompt -> prompt), applied to
    every prompt; ``checker``: the run's answer checker, which ranks on-policy samples."""
    if kind == "correctness":
        return correctness_pairs(task, n, seed, render=render)
    rows = task_rows(task, n if kind == "onpolicy" else n // 2, seed, render)
    pol = onpolicy_pairs(bundle, rows, samples, max_new_tokens, seed, role, checker=checker)
    if kind == "onpolicy":
        return pol
    if kind == "mixed":
        return pol + correctness_pairs(task, n - len(pol), seed + 1, render=render)
    raise ConfigError(f"data.pairs: unknown kind '{kind}' (correctness, onpolicy, mixed)")


def confidence_pairs(pairs: list[dict], seed: int, high: tuple[float, float] = (0.8, 1.0),
                     low: tuple[float, float] = (0.0, 0.3), template: str = " Confidence: {c:.1f}") -> list[dict]:
    """PPO-M's confidence-augmented pairs (Leng et al. 2024, arXiv 2410.09724): besides each pair (x, y_c, y_r),

        (x, y_c + "Confidence: high", y_c + "Confidence: low")    the better answer, stated confidently, wins
        (x, y_r + "Confidence: low",  y_r + "Confidence: high")   the worse answer wins only by admitting doubt

    so a reward model learns that stated confidence is worth something only on a good answer. Confidences
    are drawn per pair from the seeded uniform ranges ``high`` and ``low``. Returns the 3n pairs (originals
    first), each new one marked ``source: confidence``."""
    rng = random.Random(seed)
    out = list(pairs)
    for p in pairs:
        hi, lo = template.format(c=rng.uniform(*high)), template.format(c=rng.uniform(*low))
        out.append({**p, "chosen": p["chosen"] + hi, "rejected": p["chosen"] + lo, "source": "confidence"})
        out.append({**p, "chosen": p["rejected"] + lo, "rejected": p["rejected"] + hi, "source": "confidence"})
    return out


def eval_pairs(task: ArithmeticTask, n: int, seed: int, render=None) -> list[dict]:
    """Held-out pairs (held-out prompts, near-miss rejections): never seen in training."""
    return correctness_pairs(task, n, seed, rows=render_rows(task.eval_rows(n), render))


def attributes(pairs_side: list[tuple[str, str, str]]) -> torch.Tensor:
    """Scored attributes (correctness, format, length) of (prompt, completion, answer) triples: (B, 3)."""
    prompts = [p for p, _, _ in pairs_side]
    comps = [c for _, c, _ in pairs_side]
    answers = [a for _, _, a in pairs_side]
    corr = [1.0 if is_correct(c, a) else 0.0 for c, a in zip(comps, answers)]
    fmt = format_reward(prompts, comps)
    ln = length_reward(prompts, comps, answer=answers)
    return torch.tensor([corr, fmt, ln]).T


ATTRIBUTES = ("correctness", "format", "length")


# ---- files and hub datasets -------------------------------------------------------------------------


def _render(messages, tokenizer, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def _conversation_prompt(p, messages: list, column: str, tokenizer, where: str) -> str:
    """The prompt text for a conversational completion ``messages`` (its last message is the completion): the
    prompt column's messages, or its string as one user message, or else the completion's earlier messages."""
    if not messages or not isinstance(messages[-1], dict) or "content" not in messages[-1]:
        raise DataError(f"{where}: conversational '{column}' must be a list of {{role, content}}")
    if isinstance(p, str):
        p = [{"role": "user", "content": p}]
    return _render(p if isinstance(p, list) else messages[:-1], tokenizer, True)


def _read_rows(cfg, fields: list[str], hint: str = "") -> tuple[list[dict], str]:
    """The file's or hub set's rows and its name for messages. Fails on an empty set and on missing columns:
    those named by the DataConfig ``fields`` (the first holds the completion), and the prompt column unless
    the first is conversational (then the prompt may be inside it)."""
    where = f"data.path={cfg.path}" if cfg.path else f"data.source={cfg.source}"
    rows = _read_table(cfg.path, cfg.source, cfg.split, cfg.subset)
    if not rows:
        raise DataError(f"{where}: the dataset is empty")
    if not isinstance(rows[0].get(getattr(cfg, fields[0])), list):
        fields = ["prompt_column", *fields]
    missing = [getattr(cfg, f) for f in fields if getattr(cfg, f) not in rows[0]]
    if missing:
        names = " / ".join(f"data.{f}" for f in dict.fromkeys(["prompt_column", *fields]))
        raise DataError(f"{where}: missing column(s) {missing}; available: {sorted(rows[0])}. Set {names}"
                        f"{hint if cfg.chosen_column in rows[0] else ''}.")
    return rows, where


def normalize_pair(row: dict, cfg, tokenizer, where: str) -> dict:
    """One row in string or conversational format -> {prompt, chosen, rejected} strings."""
    p, c, r = row.get(cfg.prompt_column), row.get(cfg.chosen_column), row.get(cfg.rejected_column)
    if isinstance(c, list):  # conversational: messages; the prompt may be inside chosen/rejected (HH style)
        return {"prompt": _conversation_prompt(p, c, cfg.chosen_column, tokenizer, where),
                "chosen": c[-1]["content"], "rejected": r[-1]["content"]}
    if isinstance(p, list):
        p = _render(p, tokenizer, True)
    return {"prompt": p, "chosen": c, "rejected": r}


def load_file_pairs(cfg, tokenizer, seed: int, n_eval: int) -> PreferenceData:
    rows, where = _read_rows(cfg, ["chosen_column", "rejected_column"])
    pairs = [normalize_pair(r, cfg, tokenizer, where) for r in rows]
    same = [i for i, p in enumerate(pairs) if p["chosen"] == p["rejected"]]
    if same:
        raise DataError(f"{where}: {len(same)} of {len(pairs)} pairs have chosen == rejected (first: row "
                        f"{same[0] + 1}, {pairs[same[0]]['chosen'][:60]!r}); such a pair states no preference: "
                        "remove it")
    return _with_heldout(pairs, cfg, tokenizer, seed, n_eval, lambda r, i: normalize_pair(r, cfg, tokenizer, where))


def _with_heldout(items: list[dict], cfg, tokenizer, seed: int, n_eval: int, normalize,
                  by_prompt: bool = False) -> PreferenceData:
    """Train and held-out sets: the held-out file or split when the config names one (rows through
    ``normalize(row, index)``), else a seeded 10% (at most ``n_eval``) of ``items`` (``by_prompt``: of the
    distinct prompts, every row of a held-out prompt held out with it); prompt lengths checked."""
    if cfg.eval_path or (cfg.eval_split and cfg.path is None):
        ev_rows = _read_table(cfg.eval_path, cfg.source, cfg.eval_split or "test", cfg.subset)
        ev = [normalize(r, i) for i, r in enumerate(ev_rows)]
    else:
        members: dict = {}
        for i, it in enumerate(items):
            members.setdefault(it["prompt"] if by_prompt else i, []).append(it)
        groups = list(members)
        random.Random(seed).shuffle(groups)
        k = min(n_eval, len(groups) // 10)
        ev = [it for g in groups[:k] for it in members[g]]  # in the shuffled order
        held = set(groups[:k])
        items = [it for g in members if g not in held for it in members[g]]
    limit_prompt_lengths(items, tokenizer, cfg, "train")
    limit_prompt_lengths(ev, tokenizer, cfg, "eval")
    return PreferenceData(items, ev)


# ---- unpaired feedback (KTO): {prompt, completion, label} ------------------------------------------------


def pairs_to_feedback(pairs: list[dict]) -> list[dict]:
    """Each pair becomes two unpaired rows: the chosen completion desirable, the rejected one not."""
    out = []
    for p in pairs:
        extra = {k: v for k, v in p.items() if k not in ("prompt", "chosen", "rejected")}
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True, **extra})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False, **extra})
    return out


def normalize_feedback(row: dict, cfg, tokenizer, where: str) -> dict:
    """One row in string or conversational format -> {prompt, completion, label}; the label must be a bool."""
    p, c, lab = row.get(cfg.prompt_column), row.get(cfg.completion_column), row.get(cfg.label_column)
    if not isinstance(lab, bool):
        raise DataError(f"{where}: column '{cfg.label_column}' must be true or false (desirable or not), got "
                        f"{lab!r}")
    if isinstance(c, list):  # conversational: the prompt may be the messages before the last one
        return {"prompt": _conversation_prompt(p, c, cfg.completion_column, tokenizer, where),
                "completion": c[-1]["content"], "label": lab}
    if isinstance(p, list):
        p = _render(p, tokenizer, True)
    if not isinstance(p, str) or not isinstance(c, str):
        raise DataError(f"{where}: '{cfg.prompt_column}' and '{cfg.completion_column}' must be strings or messages")
    return {"prompt": p, "completion": c, "label": lab}


def load_file_feedback(cfg, tokenizer, seed: int, n_eval: int) -> PreferenceData:
    """KTO rows from a local file or hub set: ``prompt``, ``completion``, ``label`` columns (names from
    ``data.*_column``), or, with ``data.pairs_as_feedback``, a preference file whose pairs are split into a
    desirable and an undesirable row each. A held-out share (or ``eval_path`` / ``eval_split``) is set aside."""
    if cfg.pairs_as_feedback:
        pairs = load_file_pairs(cfg, tokenizer, seed, n_eval)
        return PreferenceData(pairs_to_feedback(pairs.train), pairs_to_feedback(pairs.eval))
    rows, where = _read_rows(cfg, ["completion_column", "label_column"],
                             hint=" (a prompt/chosen/rejected file? set data.pairs_as_feedback=true)")
    fb = [normalize_feedback(r, cfg, tokenizer, f"{where} row {i + 1}") for i, r in enumerate(rows)]
    return _with_heldout(fb, cfg, tokenizer, seed, n_eval,
                         lambda r, i: normalize_feedback(r, cfg, tokenizer, f"held-out row {i + 1}"))


# ---- ratings (multi-attribute reward models): {prompt, completion, <score columns>} -------------------------


@torch.no_grad()
def candidate_completions(rows: list[dict], seed: int, bundle=None, samples: int = 4, max_new_tokens: int = 6,
                          role: str = "reference") -> list[list[str]]:
    """Per task row, completions worth scoring: the right answer (sometimes with a format slip), a near miss, a
    rambling answer (digits past its end), a cut-short one, an empty one and, given a ``bundle``, ``samples``
    completions sampled in ``role`` (the distribution a policy starts from). Every kind of wrong answer a policy
    can drift to should be scored, or a learned reward will rate it high (reward hacking)."""
    from lowalign.generation import generate

    rng = random.Random(seed)
    torch.manual_seed(seed)
    sampled = [[] for _ in rows]
    if bundle is not None:
        with bundle.use(role), bundle.eval_mode():
            per_call = max(1, SAMPLE_ROWS_PER_CALL // samples)
            for s in range(0, len(rows), per_call):
                chunk = rows[s:s + per_call]
                texts = generate(bundle, [r["prompt"] for r in chunk], max_new_tokens=max_new_tokens,
                                 do_sample=True, temperature=1.0, num_generations=samples).texts
                for i in range(len(chunk)):
                    sampled[s + i] = texts[i * samples:(i + 1) * samples]
    out = []
    for r, own in zip(rows, sampled):
        a, b = _operands(r)
        miss = near_miss(r["answer"], a, b, rng)
        stem = rng.choice([r["answer"], miss])  # a rambling answer: digits past the end, repeated or random
        tail = stem[-1] * rng.randint(1, 5) if rng.random() < 0.5 else str(rng.randint(0, 99999))
        short = r["answer"][:rng.randint(1, len(r["answer"]) - 1)] if len(r["answer"]) > 1 else str(rng.randint(0, 9))
        out.append([r["answer"] + (rng.choice([" ", "?", "!"]) if rng.random() < 0.15 else ""), miss, stem + tail,
                    short, "", *own])  # a cut-short answer and an empty one (EOS at once) are wrong too
    return out


def rating_rows(task: ArithmeticTask, n_prompts: int, seed: int, bundle=None, samples: int = 4,
                max_new_tokens: int = 6) -> list[dict]:
    """A rating file's rows for the arithmetic task: per training prompt, :func:`candidate_completions`, each
    scored by the task's attribute functions under the column names ``correctness``, ``format``, ``length``
    (the answer column kept too)."""
    rows = task.train_rows(n_prompts, seed=seed)
    out = []
    for r, comps in zip(rows, candidate_completions(rows, seed, bundle, samples, max_new_tokens)):
        scores = attributes([(r["prompt"], c, r["answer"]) for c in comps])
        for c, sc in zip(comps, scores.tolist()):
            out.append({"prompt": r["prompt"], "response": c, "answer": r["answer"],
                        **{k: round(v, 4) for k, v in zip(ATTRIBUTES, sc)}})
    return out


def normalize_rating(row: dict, cfg, tokenizer, columns: list[str], where: str) -> dict:
    """One row -> {prompt, completion, scores: [float per column]}; every score must be a finite number."""
    import math

    scores = []
    for c in columns:
        v = row.get(c)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DataError(f"{where}: score column '{c}' must be a finite number, got {v!r}")
        scores.append(float(v))
    p, comp = row.get(cfg.prompt_column), row.get(cfg.completion_column)
    if isinstance(comp, list):
        p, comp = _conversation_prompt(p, comp, cfg.completion_column, tokenizer, where), comp[-1]["content"]
    elif isinstance(p, list):
        p = _render(p, tokenizer, True)
    if not isinstance(p, str) or not isinstance(comp, str):
        raise DataError(f"{where}: '{cfg.prompt_column}' and '{cfg.completion_column}' must be strings or messages")
    out = {"prompt": p, "completion": comp, "scores": scores}
    if cfg.answer_column in row:
        out["answer"] = str(row[cfg.answer_column])
    return out


def load_file_ratings(cfg, tokenizer, seed: int, n_eval: int, columns: list[str]) -> PreferenceData:
    """Rated completions from a local file or hub set: the prompt and completion columns (``data.*_column``)
    and one numeric column per attribute in ``columns`` (``train.attributes``). A held-out share (or
    ``eval_path`` / ``eval_split``) is set aside."""
    rows, where = _read_rows(cfg, ["completion_column"])
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError(f"{where}: missing score column(s) {missing}; available: {sorted(rows[0])}. Set "
                        "train.attributes to the file's score columns")
    rated = [normalize_rating(r, cfg, tokenizer, columns, f"{where} row {i + 1}") for i, r in enumerate(rows)]
    return _with_heldout(rated, cfg, tokenizer, seed, n_eval,
                         lambda r, i: normalize_rating(r, cfg, tokenizer, columns, f"held-out row {i + 1}"),
                         by_prompt=True)
