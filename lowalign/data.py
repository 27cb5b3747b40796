"""Prompt data for RL and SFT: the built-in arithmetic task, local JSONL/JSON/parquet files or hub datasets.

Rows are dicts with at least ``prompt`` (and ``answer`` when the file has the answer column: the answer
checker, SFT and reward functions that read it need it); every other column is passed to reward functions.
Batches are a pure function of ``(seed, step)``, so the data position of a run is just its step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lowalign.config import ConfigError, DataConfig
from lowalign.tasks.answers import CHECKERS, last_number, resolve_format
from lowalign.tasks.arithmetic import ArithmeticTask


class DataError(ValueError):
    """Bad data: missing columns, empty set, over-long prompts."""


def gsm8k_answer(text: str) -> str:
    """The final answer of a GSM8K solution: the number after '####', commas dropped."""
    num = last_number(text.split("####")[-1])
    if num is None:
        raise DataError(f"no number after '####' in answer {text[:80]!r}")
    return num


def _read_json_rows(path: str) -> list[dict]:
    """A .jsonl (one object per line) or .json (a list of objects) file, with the line and column of any
    bad byte, bad JSON or non-object row in the error."""
    import json

    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
                        "save the file as UTF-8") from e
    if Path(path).suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON at column {e.colno}: {e.msg}") from e
        numbered = list(enumerate(rows, 1))
        unit = "item"
    else:
        numbered = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON at column {e.colno}: {e.msg}: {line[:80]!r}") from e
        unit = "line"
    for i, r in numbered:
        if not isinstance(r, dict):
            raise DataError(f"{path}: {unit} {i} is a JSON {type(r).__name__}, not an object with columns")
    return [r for _, r in numbered]


def _read_table(path: str | None, source: str, split: str, subset: str | None = None) -> list[dict]:
    if path is not None:
        suffix = Path(path).suffix.lower()
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
        if kind is None:
            raise ConfigError(f"data.path: unsupported file type '{suffix}' (use .jsonl, .json, .parquet, .csv)")
        if Path(path).stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
        if kind == "json":  # read here: JSON files need no `datasets`
            return _read_json_rows(path)
    import datasets

    datasets.disable_progress_bar()
    if path is not None:
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:  # the datasets library's own errors do not name the file
            raise DataError(f"could not read {path} as {kind}: {type(e).__name__}: {e}") from e
    else:
        ds = datasets.load_dataset(source, subset, split=split)
    return [dict(r) for r in ds]


def epoch_indices(size: int, step: int, n: int, seed: int) -> list[int]:
    """Indices for step ``step`` of ``n`` items per step over epochs of seeded permutations of
    ``range(size)``: a pure function of its arguments, so a run's data position is just its step."""
    out, pos = [], step * n
    while len(out) < n:
        epoch, i = divmod(pos, size)
        order = list(range(size))
        random.Random(seed * 7919 + epoch).shuffle(order)
        take = min(n - len(out), size - i)
        out += order[i:i + take]
        pos += take
    return out


@dataclass
class PromptData:
    """Training rows (or a task that generates them) and held-out rows, plus the answer checker (the one
    ``data.answer_format`` names: accuracy, the report, ``bon`` and correctness rewards all use it)."""

    train_rows: list[dict] | None
    eval_rows_all: list[dict]
    checker: object
    task: ArithmeticTask | None = None
    pairs: object = None  # PreferenceData (pairs, or KTO feedback rows), for preference algorithms on files
    render: object = None  # the task's chat template (prompt -> prompt), set by prepare_prompts
    view: object = None  # completion -> what learned rewards score (data.think: the answer part)

    def batch(self, step: int, n: int, seed: int) -> list[dict]:
        """Rows for training step ``step`` (0-based); deterministic in ``(seed, step)``."""
        if self.task is not None:
            return render_rows(self.task.train_rows(n, seed=seed * 1_000_003 + step), self.render)
        return [self.train_rows[j] for j in epoch_indices(len(self.train_rows), step, n, seed)]

    def eval_rows(self, n: int) -> list[dict]:
        return self.eval_rows_all[:n]


def _normalize(rows: list[dict], cfg: DataConfig, where: str) -> list[dict]:
    if not rows:
        raise DataError(f"{where}: the dataset is empty")
    if cfg.prompt_column not in rows[0]:
        raise DataError(f"{where}: missing column '{cfg.prompt_column}'; available: {sorted(rows[0])}. "
                        "Set data.prompt_column.")
    has_answer = cfg.answer_column in rows[0]
    out = []
    for r in rows:
        row = dict(r)
        try:
            row["prompt"] = cfg.prompt_template.format(**{**r, "prompt": r[cfg.prompt_column]})
        except KeyError as e:
            raise ConfigError(f"data.prompt_template: unknown field {e} (columns: {sorted(r)})") from e
        if has_answer:
            ans = str(r[cfg.answer_column])
            row["answer"] = gsm8k_answer(ans) if cfg.answer_format == "gsm8k" else ans.strip()
        out.append(row)
    return out


def is_builtin(cfg: DataConfig) -> bool:
    """Whether the run reads the built-in task (no file, no hub set)."""
    return cfg.path is None and cfg.source.startswith("builtin:")


def load_prompt_data(cfg: DataConfig, seed: int, n_eval: int) -> PromptData:
    """Read and validate rows (cheap: no model, no tokenizer)."""
    fmt = resolve_format(cfg.answer_format, cfg.chat_template)
    if cfg.path is None and cfg.source == "builtin:arithmetic":
        t = cfg.task
        task = ArithmeticTask(ops=t.ops, max_operand=t.max_operand, eval_fraction=t.eval_fraction,
                              split_seed=t.split_seed, question=cfg.chat_template, question_template=t.question)
        return PromptData(None, task.eval_rows(), _checker(CHECKERS[fmt], cfg), task, view=_view(cfg))
    where = f"data.path={cfg.path}" if cfg.path else f"data.source={cfg.source}"
    rows = _normalize(_read_table(cfg.path, cfg.source, cfg.split, cfg.subset), cfg, where)
    if cfg.eval_path or (cfg.eval_split and cfg.path is None):  # eval_split names a split of a hub source
        ev_where = f"data.eval_path={cfg.eval_path}" if cfg.eval_path else f"data.eval_split={cfg.eval_split}"
        ev = _normalize(_read_table(cfg.eval_path, cfg.source, cfg.eval_split or "test", cfg.subset), cfg, ev_where)
    else:  # hold out a seeded slice (at most 10%) and keep it out of training
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        k = min(n_eval, len(rows) // 10)
        if k == 0 and n_eval > 0:  # eval.num_examples=0: no held-out set asked for
            raise DataError(f"{where}: too few rows ({len(rows)}) to hold out an evaluation set; "
                            "set data.eval_path")
        ev = [rows[i] for i in order[:k]]
        rows = [rows[i] for i in sorted(order[k:])]
    has_answer = "answer" in rows[0]  # a prompt-only file (rewards only) has no checker and reports no accuracy
    return PromptData(rows, ev, _checker(CHECKERS[fmt], cfg) if has_answer else None, view=_view(cfg))


def _checker(checker, cfg: DataConfig):
    """The answer checker, reading only the answer after </think> when ``data.think`` is on."""
    from lowalign.tasks.think import AnswerPartChecker

    return AnswerPartChecker(checker) if cfg.think else checker


def _view(cfg: DataConfig):
    """What learned rewards read of a completion: the answer part with ``data.think``, else all of it."""
    from lowalign.tasks.think import answer_part

    return answer_part if cfg.think else None


def render_row(row: dict, render) -> dict:
    """``row`` with its prompt through the chat template; the plain text kept as ``_question`` (shown in
    reports; columns starting with '_' are not passed to reward functions)."""
    return {**row, "_question": row.get("_question", row["prompt"]), "prompt": render(row["prompt"])}


def render_rows(rows: list[dict], render) -> list[dict]:
    """``rows`` through the run's chat template (:func:`render_row`), or as they are when it has none."""
    return [render_row(r, render) for r in rows] if render else rows


def prepare_prompts(data: PromptData, tokenizer, cfg: DataConfig) -> list[str]:
    """Render chat templates, then apply the truncation policy to over-long prompts (before training).
    Returns notes for the log."""
    if data.train_rows is None and data.task is None:
        return []
    if cfg.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.chat_template: true, but the tokenizer has no chat template")

        def render(text: str) -> str:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)

        for rows in (data.train_rows or [], data.eval_rows_all):
            rows[:] = render_rows(rows, render)
        if data.task is not None:
            data.render = render
    notes = []
    train = data.train_rows if data.task is None else data.batch(0, 64, 0)  # the task's prompts: a sample
    for name, rows in (("train", train), ("eval", data.eval_rows_all)):
        note = limit_prompt_lengths(rows, tokenizer, cfg, name)
        if note:
            notes.append(note)
    return notes


def limit_prompt_lengths(rows: list[dict], tokenizer, cfg: DataConfig, name: str) -> str | None:
    """Apply ``cfg.truncation`` to rows whose ``prompt`` exceeds ``cfg.max_prompt_tokens``, in place:
    error (count + example), drop them, or keep the prompt's end ('left', where the question sits).
    Returns a note for the log, or None when every prompt fits."""
    lens = [len(tokenizer(r["prompt"], add_special_tokens=False).input_ids) for r in rows]
    long = [i for i, n in enumerate(lens) if n > cfg.max_prompt_tokens]
    if not long:
        return None
    msg = (f"{len(long)} of {len(rows)} {name} prompts exceed data.max_prompt_tokens="
           f"{cfg.max_prompt_tokens} (longest {max(lens)} tokens; e.g. {rows[long[0]]['prompt'][:100]!r}...)")
    if cfg.truncation == "error":
        raise DataError(msg + ". Raise the limit or set data.truncation to 'left' or 'drop'.")
    if cfg.truncation == "drop":
        drop = set(long)
        rows[:] = [r for i, r in enumerate(rows) if i not in drop]
        if not rows:
            raise DataError(msg + "; nothing left after dropping them")
    else:
        for i in long:
            ids = tokenizer(rows[i]["prompt"], add_special_tokens=False).input_ids
            rows[i]["prompt"] = tokenizer.decode(ids[-cfg.max_prompt_tokens:])
    return msg + f"; {cfg.truncation}"
