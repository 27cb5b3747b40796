"""Run reports: PNG plots of a run's metrics and a Markdown summary (``lowalign report RUN_DIR [RUN_DIR ...]``).

Reads only what a run directory holds (``config.yaml``, ``metrics.jsonl``, ``baseline.json``,
``summary.json``), so it works on a finished run, on one still running (no ``summary.json`` yet: plots of
the steps so far) and on a copied directory. It reads the files itself rather than through
``lowalign.runtime.RunDir``, which would import torch and double the time of ``lowalign report`` (measured
2.6 s vs 5 s). Several run directories overlay on the same axes, one colour per run. Plots are drawn with
matplotlib's object API (no pyplot, no global backend), so a notebook's own plotting is left alone.

``report.md`` prints every number it takes from ``summary.json`` exactly as ``summary.json`` holds it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml


class ReportError(ValueError):
    """A directory cannot be reported on (not a run directory, or nothing logged yet)."""


# ---- reading a run directory ------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]  # metrics.jsonl, one per step
    baseline: dict | None  # baseline.json: held-out metrics (and samples) before training
    summary: dict | None  # summary.json; None while the run is still going

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm", "?"))

    @property
    def last_step(self) -> int:
        return int(self.rows[-1]["step"]) if self.rows else 0

    @cached_property
    def keys(self) -> set[str]:
        """Every metric with a number in some row (the rows are read once and not changed)."""
        return {k for r in self.rows for k, v in r.items() if _is_num(v)}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run(path) -> Run:
    p = Path(path)
    if not p.is_dir():
        raise ReportError(f"{path}: no such directory")
    if not (p / "config.yaml").exists():
        raise ReportError(f"{path}: not a lowalign run directory (no config.yaml)")
    lines = (p / "metrics.jsonl").read_text().splitlines() if (p / "metrics.jsonl").exists() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError:
            if i + 1 < len(lines):  # only the last line may be cut (a run killed mid-write)
                raise ReportError(f"{p / 'metrics.jsonl'}: line {i + 1} is not JSON") from None
    summary = _json(p / "summary.json")
    if not rows and summary is None:
        raise ReportError(f"{path}: nothing to report yet (no metrics.jsonl rows and no summary.json)")
    return Run(p, yaml.safe_load((p / "config.yaml").read_text()) or {}, rows, _json(p / "baseline.json"), summary)


def _json(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.exists() else None


# ---- series and panels ------------------------------------------------------------------------------


def series(run: Run, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the metrics rows that hold a finite number for it."""
    xs, ys = [], []
    for r in run.rows:
        v = r.get(key)
        if _is_num(v):
            xs.append(float(r["step"]))
            ys.append(float(v))
    return xs, ys


def heldout_series(run: Run, key: str) -> tuple[list[float], list[float]]:
    """Held-out ``key``: the baseline at step 0, periodic ``eval/<key>`` rows, the final value at the end."""
    xs, ys = [], []
    before = (run.summary or {}).get("baseline") or run.baseline or {}
    if _is_num(before.get(key)):
        xs.append(0.0)
        ys.append(float(before[key]))
    ex, ey = series(run, f"eval/{key}")
    xs += ex
    ys += ey
    after = (run.summary or {}).get("final") or {}
    if _is_num(after.get(key)):
        xs.append(float(max(run.last_step, xs[-1] if xs else 0)))
        ys.append(float(after[key]))
    return xs, ys


def heldout_keys(run: Run, accuracy: bool) -> list[str]:
    """Held-out metrics the run reports before/after: the accuracies, or the rest (mean rewards)."""
    keys = set()
    for part in ((run.summary or {}).get("baseline"), run.baseline, (run.summary or {}).get("final")):
        keys |= {k for k, v in (part or {}).items() if _is_num(v) and k != "n"}
    return sorted(k for k in keys if k.endswith("accuracy") == accuracy)


PREFERENCE_REWARDS = {"chosen", "rejected", "margin", "accuracy", "desirable", "undesirable"}


def _present(*names):
    return lambda run: [k for k in names if k in run.keys]


def _training_rewards(run: Run) -> list[str]:
    ks = run.keys
    if "reward" not in ks:
        return []
    return ["reward"] + sorted(k for k in ks if k.startswith("rewards/") and k.split("/")[1] not in PREFERENCE_REWARDS)


def _pref_margins(run: Run) -> list[str]:
    return _present("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/desirable",
                    "rewards/undesirable", "scores/chosen", "scores/rejected", "margin")(run)


def _pref_accuracy(run: Run) -> list[str]:
    ks = run.keys
    return [k for k in ("rewards/accuracy",) if k in ks] + (["accuracy"] if "scores/chosen" in ks else [])


@dataclass(frozen=True)
class Panel:
    """One PNG: the metrics ``keys(run)`` picks, against the step, with a title and a unit on the y axis."""

    name: str
    title: str
    ylabel: str
    keys: Callable[[Run], list[str]]
    kind: str = "train"  # train: metrics rows; heldout: baseline -> eval rows -> final; band: ES fitness
    fraction: bool = False  # a share in [0, 1]: the y axis starts at 0


PANELS = (
    Panel("heldout_accuracy", "Held-out accuracy (greedy completions)", "fraction correct",
          lambda run: heldout_keys(run, accuracy=True), kind="heldout", fraction=True),
    Panel("heldout_reward", "Held-out reward (greedy completions)", "mean reward per completion",
          lambda run: heldout_keys(run, accuracy=False), kind="heldout"),
    Panel("reward", "Training reward per source", "mean reward per completion", _training_rewards),
    Panel("fitness", "ES fitness of the population (band: min to max)", "fitness (mean reward)",
          _present("fitness/mean"), kind="band"),
    Panel("sigma", "ES perturbation scale", "sigma (singular-value units)", _present("sigma")),
    Panel("preference_margins", "Rewards of chosen and rejected (DPO family: implicit; reward model: scores)",
          "reward (DPO: beta x log-ratio, nats)", _pref_margins),
    Panel("preference_accuracy", "Preference accuracy on training batches", "fraction of pairs ranked right",
          _pref_accuracy, fraction=True),
    Panel("kl", "KL to the reference", "nats per token", _present("kl", "approx_kl", "reward_kl", "kl/chosen",
                                                                  "kl/rejected")),
    Panel("clip_fraction", "Clipped fraction of tokens", "fraction of tokens",
          _present("clip_ratio/region", "clip_ratio/low", "clip_ratio/high", "policy_clipfrac", "value_clipfrac"),
          fraction=True),
    Panel("entropy", "Policy entropy", "nats per token", _present("entropy")),
    Panel("loss", "Loss", "loss (per token or per pair)", _present("loss", "policy_loss", "value_loss", "nll",
                                                                    "rank_loss")),
    Panel("grad_norm", "Gradient norm before clipping", "L2 norm", _present("grad_norm")),
    Panel("completion_length", "Completion length", "tokens", _present("completion_length")),
)

STYLES = ("-", "--", ":", "-.")


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def draw(panel: Panel, runs: list[Run], path: Path) -> bool:
    """Draw ``panel`` for ``runs`` into ``path`` (PNG); False (nothing written) when no run has its metrics."""
    from matplotlib.figure import Figure

    picked = [(run, panel.keys(run)) for run in runs]
    if not any(keys for _, keys in picked):
        return False
    fig = Figure(figsize=(7, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (run, keys), color in zip(picked, colors):
        for j, key in enumerate(keys):
            label = _label(key) if len(runs) == 1 else f"{run.name}: {_label(key)}"
            style = STYLES[j % len(STYLES)]
            if panel.kind == "heldout":
                xs, ys = heldout_series(run, key)
                ax.plot(xs, ys, style, marker="o", color=color, label=label)
                continue
            xs, ys = series(run, key)
            if panel.kind == "band":
                _, lo = series(run, "fitness/min")
                _, hi = series(run, "fitness/max")
                if len(lo) == len(xs) == len(hi):
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
            if len(xs) > 30:  # noisy per-step numbers: faint raw line, bold moving average
                window = max(2, len(xs) // 20)
                ax.plot(xs, ys, style, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(xs, _smooth(ys, window), style, color=color, linewidth=1.8,
                        label=f"{label} (mean of {window})")
            else:
                ax.plot(xs, ys, style, color=color, marker="." if len(xs) < 15 else None, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(panel.title)
    ax.set_xlabel(_xlabel(runs))
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if panel.fraction:
        ax.set_ylim(0, max(1.0 if panel.kind == "heldout" else 0.05, ax.get_ylim()[1]))
    ax.legend(fontsize="small", loc="best")
    fig.savefig(path)
    return True


def _label(key: str) -> str:
    return key.removeprefix("rewards/") if key.startswith("rewards/") and key != "rewards/accuracy" else key


def _xlabel(runs: list[Run]) -> str:
    algos = {r.algorithm for r in runs}
    if algos == {"essa"}:
        return "generation"
    return "step (generation for ES)" if "essa" in algos else "optimizer step"


# ---- report.md ----------------------------------------------------------------------------------------


def _num(v) -> str:
    """A number exactly as summary.json holds it (JSON's shortest round-trip form)."""
    return json.dumps(v)


def _cell(text, limit: int = 160) -> str:
    s = str(text)
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("|", "\\|").replace("\n", "<br>")


def _results(run: Run) -> list[str]:
    s = run.summary
    if s is None:
        return [f"Still running or stopped before the end: {len(run.rows)} steps logged, no summary.json yet.", ""]
    lines = ["| held-out metric | before | after | change |", "|---|---|---|---|"]
    before, after = s.get("baseline") or {}, s.get("final") or {}
    for k in [k for k in after if _is_num(after[k])] + [k for k in before if k not in after and _is_num(before[k])]:
        b, a = before.get(k), after.get(k)
        change = f"{a - b:+.4f}" if _is_num(a) and _is_num(b) and k != "n" else ""
        lines.append(f"| {k} | {_num(b) if _is_num(b) else '-'} | {_num(a) if _is_num(a) else '-'} | {change} |")
    lines += ["", "| measure | value |", "|---|---|"]
    if _is_num(s.get("wall_time_s")):
        lines.append(f"| wall time (s) | {_num(s['wall_time_s'])} |")
    if _is_num(s.get("peak_memory_bytes")):
        lines.append(f"| peak memory (bytes) | {_num(s['peak_memory_bytes'])} ({s['peak_memory_bytes'] / 2**20:.1f} "
                     f"MiB, {'GPU allocated' if _is_num(s.get('peak_memory_reserved_bytes')) else 'process RSS'}) |")
    skip = {"wall_time_s", "peak_memory_bytes"}
    lines += [f"| {k} | {_num(v)} |" for k, v in s.items() if k not in skip and _is_num(v)]
    phases = (s.get("memory_by_phase") or {}).get("peak_mib")
    if phases:
        lines += ["", "| phase | peak memory (MiB) |", "|---|---|"]
        lines += [f"| {k} | {_num(v)} |" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])]
    return lines + [""]


def _samples(run: Run, n: int) -> list[str]:
    before = {x["prompt"]: x for x in ((run.baseline or {}).get("samples") or [])}
    after = ((run.summary or {}).get("final_samples") or [])[:n]
    if not after and not before:
        return []
    lines = ["Greedy completions of the first held-out prompts, before and after training.", "",
             "| prompt | answer | before | after |", "|---|---|---|---|"]
    rows = after or [{"prompt": p} for p in list(before)[:n]]
    for x in rows:
        b = before.get(x["prompt"], {})
        lines.append(f"| {_cell(x['prompt'])} | {_cell(x.get('answer', b.get('answer', '')))} | "
                     f"{_sample(b)} | {_sample(x)} |")
    return lines + [""]


def _sample(x: dict) -> str:
    if "completion" not in x:
        return "-"
    mark = {True: " ✓", False: " ✗"}.get(x.get("correct"), "")
    return f"{_cell(repr(x['completion']))}{mark}"


def write_report(run_dirs, out=None, samples: int = 5) -> Path:
    """Plots and ``report.md`` for ``run_dirs`` into ``out`` (default: ``<run>/report`` for one run,
    ``runs/compare-<time>`` for several). Returns the path of ``report.md``."""
    runs = [read_run(d) for d in run_dirs]
    if not runs:
        raise ReportError("no run directories given")
    if out is None:
        out = runs[0].path / "report" if len(runs) == 1 else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = [p for p in PANELS if draw(p, runs, out / f"{p.name}.png")]
    title = runs[0].name if len(runs) == 1 else ", ".join(r.name for r in runs)
    lines = [f"# lowalign report: {title}", "", "| run | algorithm | model | steps logged | status |",
             "|---|---|---|---|---|"]
    for r in runs:
        model = (r.config.get("model") or {}).get("name_or_path", "?")
        lines.append(f"| {r.name} | {r.algorithm} | {model} | {len(r.rows)} | "
                     f"{'finished' if r.summary else 'running or stopped'} |")
    lines += ["", "## Plots", ""] + [f"![{p.title}]({p.name}.png)" + "\n" for p in drawn]
    for r in runs:
        lines += [f"## {r.name}", "", f"`{r.path}`", "", "### Results", ""] + _results(r)
        smp = _samples(r, samples)
        if smp:
            lines += ["### Samples", ""] + smp
        lines += ["### Resolved config", "", "```yaml", yaml.safe_dump(r.config, sort_keys=False).rstrip(), "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
