"""`lowalign report` and the end-of-run report: valid PNGs with labelled axes, report.md whose numbers are
summary.json's, overlays of several runs, clear errors on what is not a run directory."""

import json
import re
import shutil

import pytest

from lowalign.cli import main
from lowalign.report import PANELS, ReportError, read_run, write_report

from .algorithms.helpers import cli, metrics, summary

PNG = b"\x89PNG\r\n\x1a\n"
GRPO = ["grpo_tiny", "train.steps=4", "eval.num_examples=40", "eval.every=2", "train.checkpoint_every=0"]
ES = ["es_tiny", "train.generations=3", "train.population_size=4", "train.prompts_per_generation=8",
      "eval.num_examples=40", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("report") / "grpo"
    cli("run", *GRPO, f"output_dir={d}")
    return d


@pytest.fixture(scope="module")
def es_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("report") / "es"
    cli("run", *ES, f"output_dir={d}")
    return d


def png_size(path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature; then decoded in full."""
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR", f"{path} is not a PNG"
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and img.std() > 0.01, f"{path} is blank"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def table(md: str, header: str) -> dict[str, list[str]]:
    """Rows of the Markdown table whose header row starts with ``header``: first cell -> the others."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {header} |"))
    out = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split(" | ")]
        out[cells[0]] = cells[1:]
    return out


def check_numbers(report_md: str, s: dict) -> None:
    held = table(report_md, "held-out metric")
    assert set(held) == {k for k in s["final"] if isinstance(s["final"][k], (int, float))}
    for k, (before, after, _) in held.items():
        assert json.loads(before) == s["baseline"][k] and json.loads(after) == s["final"][k], k
    run = table(report_md, "measure")
    assert json.loads(run["wall time (s)"][0]) == s["wall_time_s"]
    assert json.loads(run["peak memory (bytes)"][0].split()[0]) == s["peak_memory_bytes"]
    for k, v in s.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("wall_time_s", "peak_memory_bytes"):
            assert json.loads(run[k][0]) == v, k


def test_grpo_run_ends_with_a_report_whose_numbers_are_the_summary(grpo_run):
    out = grpo_run / "report"
    md = (out / "report.md").read_text()
    s = summary(grpo_run)
    check_numbers(md, s)
    for name in ("reward", "heldout_accuracy", "heldout_reward", "loss", "grad_norm", "entropy", "clip_fraction"):
        w, h = png_size(out / f"{name}.png")
        assert w >= 600 and h >= 400
        assert f"]({name}.png)" in md
    assert not (out / "fitness.png").exists()  # ES panels only for ES runs
    samples = table(md, "prompt")
    assert [x["prompt"] for x in s["final_samples"]] == list(samples)
    assert "algorithm: grpo" in md and "steps: 4" in md  # the resolved config


def test_es_report_has_fitness_and_sigma(es_run, tmp_path):
    assert main(["report", str(es_run), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    check_numbers(md, summary(es_run))
    for name in ("fitness", "sigma", "heldout_accuracy"):
        png_size(tmp_path / "r" / f"{name}.png")
    assert not (tmp_path / "r" / "reward.png").exists() and not (tmp_path / "r" / "loss.png").exists()


def test_panels_pick_the_metrics_they_plot_and_label_axes(grpo_run, es_run):
    from matplotlib.figure import Figure

    saved = []
    orig = Figure.savefig
    Figure.savefig = lambda self, path, **kw: saved.append(self) or orig(self, path, **kw)
    try:
        write_report([grpo_run, es_run], grpo_run.parent / "overlay")
    finally:
        Figure.savefig = orig
    assert saved
    for fig in saved:
        ax = fig.axes[0]
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert ax.get_legend() is not None and ax.get_legend().get_texts()
    # held-out accuracy of both runs on one axes: their names in the legend, each from 0 to its last step
    acc = next(f for f in saved if f.axes[0].get_title().startswith("Held-out accuracy")).axes[0]
    labels = [t.get_text() for t in acc.get_legend().get_texts()]
    assert any(lab.startswith("grpo:") for lab in labels) and any(lab.startswith("es:") for lab in labels)
    g = read_run(grpo_run)
    line = next(ln for ln in acc.get_lines() if ln.get_label() == "grpo: accuracy")
    xs, ys = line.get_data()
    evals = [r["eval/accuracy"] for r in metrics(grpo_run) if "eval/accuracy" in r]
    assert list(ys) == [g.summary["baseline"]["accuracy"], *evals, g.summary["final"]["accuracy"]]
    assert xs[0] == 0 and xs[-1] == 4
    reward = next(p for p in PANELS if p.name == "reward")
    assert reward.keys(g) == ["reward", "rewards/correctness_reward", "rewards/format_reward"]
    assert reward.keys(read_run(es_run)) == []


def test_report_of_a_run_still_going(grpo_run, tmp_path):
    d = tmp_path / "running"
    shutil.copytree(grpo_run, d, ignore=shutil.ignore_patterns("summary.json", "report"))
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')  # a line cut by a kill
    md = write_report([d]).read_text()
    assert "no summary.json yet" in md and (d / "report" / "reward.png").exists()


def test_report_errors_name_the_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a lowalign run directory (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "empty" / "config.yaml").write_text("algorithm: grpo\n")
    with pytest.raises(ReportError, match="nothing to report yet"):
        write_report([tmp_path / "empty"])
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ReportError, match=re.escape("line 2 is not JSON")):
        read_run(tmp_path / "empty")
