"""The tests' fork server (tests/forked_cli.py) runs the CLI as a fresh interpreter does: the same exit codes,
output and numbers as `python -m lowalign` in a subprocess, and it steps aside when the environment differs."""

import json
import os
import subprocess
import sys

import pytest

from tests import forked_cli

from .algorithms.helpers import REPO, metrics, same_adapters


def fresh(*args, cwd=REPO):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lowalign", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def forked(*args, cwd=REPO):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    assert forked_cli.forked_ok(env)
    return forked_cli.run(list(map(str, args)), env, cwd, timeout=600)


@pytest.mark.parametrize("args", [("validate", "recipes/grpo_tiny.yaml"),
                                  ("validate", "recipes/grpo_tiny.yaml", "train.beta=-1"),
                                  ("validate", "recipes/no_such_recipe.yaml"),
                                  ("nonsense",)], ids=["ok", "bad_field", "missing", "usage"])
def test_exit_code_and_output_equal_a_subprocess(args):
    a, b = forked(*args), fresh(*args)
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)


def test_working_directory_and_environment_are_the_commands(tmp_path):
    (tmp_path / "r.yaml").write_text((REPO / "recipes" / "grpo_tiny.yaml").read_text())
    a, b = forked("validate", "r.yaml", cwd=tmp_path), fresh("validate", "r.yaml", cwd=tmp_path)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    assert not forked_cli.forked_ok({**os.environ, "HF_HUB_OFFLINE": "1"})  # read at import time: a subprocess


@pytest.mark.slow
def test_a_forked_run_equals_a_fresh_interpreters(tmp_path):
    args = ["run", "recipes/grpo_tiny.yaml", "train.steps=3", "eval.num_examples=8", "threads=1"]
    a = forked(*args, f"output_dir={tmp_path / 'forked'}")
    b = fresh(*args, f"output_dir={tmp_path / 'fresh'}")
    assert a.returncode == b.returncode == 0, a.stderr[-2000:] + b.stderr[-2000:]
    clock = lambda k: k.startswith(("time", "memory")) or k.endswith("_s")  # noqa: E731  (timings, tokens_per_s)
    drop = lambda rows: [{k: v for k, v in r.items() if not clock(k)} for r in rows]  # noqa: E731
    assert drop(metrics(tmp_path / "forked")) == drop(metrics(tmp_path / "fresh"))
    assert same_adapters(tmp_path / "forked", tmp_path / "fresh", "policy")
    fa, fb = (json.loads((tmp_path / d / "summary.json").read_text())["final"] for d in ("forked", "fresh"))
    assert fa == fb


def test_forked_ranks_get_torchruns_variables_and_fail_together(monkeypatch):
    """``run_ranks``: each rank gets the variables torchrun sets and ``init_process_group`` reads (RANK,
    WORLD_SIZE, one MASTER_PORT), rank 0's output comes first, and a rank that fails fails the run with its
    code. (tests/reliability/test_data_parallel.py trains through it: two ranks equal one process.)"""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    assert forked_cli.forked_ok(env)
    envs, start = [], forked_cli.start
    monkeypatch.setattr(forked_cli, "start", lambda argv, e, cwd: envs.append(e) or start(argv, e, cwd))
    ok = forked_cli.run_ranks(2, ["validate", "recipes/grpo_tiny.yaml"], env, REPO, timeout=600)
    assert ok.returncode == 0 and ok.stdout == 2 * fresh("validate", "recipes/grpo_tiny.yaml").stdout
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "2"), ("1", "1", "2")]
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"] and envs[0]["MASTER_ADDR"] == "127.0.0.1"
    bad = forked_cli.run_ranks(2, ["validate", "recipes/no_such_recipe.yaml"], env, REPO, timeout=600)
    assert bad.returncode == fresh("validate", "recipes/no_such_recipe.yaml").returncode != 0
