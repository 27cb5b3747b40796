"""Hardening, part two: a user's folder is never written into, a resume override cannot break the run, a damaged
checkpoint falls back to the newest intact one, ``checkpoints/latest`` stays inside the run, model problems are
found before any run directory exists, and Ctrl-C ends with one line and exit code 130."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ..algorithms.helpers import REPO, cli, metrics, same_adapters

TINY = ["eval.num_examples=4", "train.prompts_per_step=2", "train.num_generations=2", "threads=1"]


def _snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _run(run, *extra, check=True):
    return cli("run", "recipes/grpo_tiny.yaml", f"output_dir={run}", *TINY, *extra, check=check)


def test_a_users_own_directory_is_never_written_into(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "summary.json").write_text('{"my": "results"}\n')
    (mine / "notes.txt").write_text("do not lose\n")
    before = _snapshot(mine)
    p = _run(mine, "train.steps=1", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert (f"output_dir: {mine} is not empty (config.yaml, notes.txt, summary.json) and is not a lowalign run "
            "directory") in p.stderr
    assert "Loading weights" not in p.stderr and _snapshot(mine) == before
    # an empty directory is fine, and the run marks it as lowalign's
    empty = tmp_path / "empty"
    empty.mkdir()
    _run(empty, "train.steps=1")
    assert (empty / ".lowalign-run").is_file()


def test_a_resume_override_cannot_break_the_run(tmp_path):
    run = tmp_path / "run"
    _run(run, "train.steps=2", "train.checkpoint_every=2", "lora.r=16")
    cfg = (run / "config.yaml").read_bytes()
    for override, says in (("lora.r=8", "resume: cannot change lora.r (lora.r: 16 in the run, 8 now): it changes "
                                        "what the checkpoint holds"),
                           ("train.optim.learning_rate=0.05", "resume: cannot change train.optim.learning_rate "
                                                              "(train.optim.learning_rate: 0.001 in the run, 0.05 "
                                                              "now): the optimizer and its schedule are restored"),
                           ("data.task.max_operand=50", "resume: cannot change data.task.max_operand")):
        p = cli("run", run, override, check=False)
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-1500:]
        assert "Loading weights" not in p.stderr and (run / "config.yaml").read_bytes() == cfg
    p = cli("run", run, "train.steps=3", "eval.num_examples=2")  # fields a resume may change: applied, recorded
    assert "resume: eval.num_examples 4 -> 2" in p.stderr and "train.steps 2 -> 3" in p.stderr
    text = (run / "config.yaml").read_text()
    assert "  steps: 3\n" in text and "  num_examples: 2\n" in text
    history = [ln for ln in text.splitlines() if ln.startswith("# resumed")]
    assert len(history) == 1 and history[0].startswith("# resumed at step 2 on ")
    assert history[0].endswith("eval.num_examples 4 -> 2, train.steps 2 -> 3")
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    cli("run", run)  # and a plain resume of the finished run still works


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    run = tmp_path / "run"
    _run(run, "train.steps=4", "train.checkpoint_every=2")
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(run / "adapters", uninterrupted / "adapters")
    f = run / "checkpoints" / "step_000004" / "adapters" / "policy" / "adapter_model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    p = cli("run", run)
    assert (f"checkpoint step_000004 is damaged (adapters/policy/adapter_model.safetensors has {size // 2} bytes, "
            f"the manifest says {size}); trying an older one") in p.stderr
    assert "(step 2)" in p.stderr and "Traceback" not in p.stderr
    assert same_adapters(run, uninterrupted, "policy")
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    # checkpoints/latest pointing outside the run is not followed: the run's own newest checkpoint is used
    elsewhere = tmp_path / "elsewhere" / "step_000038"
    shutil.copytree(run / "checkpoints" / "step_000004", elsewhere)
    (elsewhere / "state.json").write_text(json.dumps({**json.loads((elsewhere / "state.json").read_text()),
                                                      "step": 38}))
    (run / "checkpoints" / "latest").write_text(str(elsewhere))
    p = cli("run", run, "train.steps=5")
    assert "elsewhere" not in p.stderr and "(step 4)" in p.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]
    # a changed byte of the same size is caught by the hash; with no intact checkpoint left: one clear line
    for step in (run / "checkpoints").glob("step_*"):
        t = step / "trainer.json"
        t.write_text(t.read_text().replace("{", " ", 1))
    p = cli("run", run, check=False)
    assert p.returncode == 2 and "trainer.json does not match its sha256 in the manifest" in p.stderr
    assert "no intact checkpoint in" in p.stderr and "Traceback" not in p.stderr


def test_latest_is_resolved_inside_checkpoints_only(tmp_path):
    """A pointer naming anything but a step folder of checkpoints/ is ignored (the newest step folder is used);
    the CLI path through it is in the damaged-checkpoint test."""
    from lowalign.runtime import Checkpointer, RunDir

    run = RunDir(tmp_path / "run")
    ck = Checkpointer(run)
    for step in ("step_000002", "step_000004"):
        (ck.root / step).mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere" / "step_000038"
    elsewhere.mkdir(parents=True)
    for pointer in (str(elsewhere), "../../elsewhere/step_000038", "step_000038/../../../elsewhere/step_000038",
                    "step_000002/..", ""):
        (ck.root / "latest").write_text(pointer)
        assert ck.latest() is None and ck.candidates() == [ck.root / "step_000004", ck.root / "step_000002"]
    (ck.root / "latest").write_text("step_000002\n")
    assert ck.candidates() == [ck.root / "step_000002", ck.root / "step_000004"]


def test_model_problems_are_found_before_any_run_directory(tmp_path, tiny_llama_dir):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_llama_dir, no_weights)
    for w in no_weights.glob("*.safetensors"):
        w.unlink()
    cases = [
        (str(no_weights), {}, f"model.name_or_path: {no_weights} has a config.json but no weights"),
        ("lowalign-test/no-such-model", {"HF_HUB_OFFLINE": "1"},
         "model.name_or_path: 'lowalign-test/no-such-model' is not a local directory, not in the local Hugging "
         "Face cache"),
        (str(tmp_path / "models" / "my-modle"), {}, f"model.name_or_path: directory not found: "
                                                    f"{tmp_path / 'models' / 'my-modle'} ({tmp_path / 'models'} "
                                                    "holds: my-model)"),
    ]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "my-model").mkdir()
    for name, env, says in cases:
        t = time.time()
        p = cli("run", "recipes/grpo_tiny.yaml", f"output_dir={tmp_path / 'run'}", f"model.name_or_path={name}",
                "lora.target_modules=[q_proj,v_proj]", env=env, check=False)
        assert p.returncode == 2 and says in p.stderr and "Traceback" not in p.stderr, p.stderr[-1500:]
        assert time.time() - t < 60 and not (tmp_path / "run").exists()
    # a relative name with one '/' may be a hub id: offline and not cached, its neighbours are named too
    p = cli("run", REPO / "recipes/grpo_tiny.yaml", f"output_dir={tmp_path / 'run'}",
            "model.name_or_path=models/my-modle",
            "lora.target_modules=[q_proj,v_proj]", env={"HF_HUB_OFFLINE": "1"}, check=False, cwd=tmp_path)
    assert p.returncode == 2 and "'models/my-modle' is not a local directory (models holds: my-model)" in p.stderr


def test_an_unreachable_hub_is_detected_in_seconds(monkeypatch):
    from lowalign import models
    from lowalign.config import ConfigError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://192.0.2.1")  # TEST-NET-1: never answers
    t = time.time()
    assert not models.hub_reachable(timeout=1.0)
    assert time.time() - t < 3
    with pytest.raises(ConfigError, match=r"not in the local Hugging Face cache .* the hub cannot be reached"):
        models.check_source("lowalign-test/no-such-model")


def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lowalign", "run", "recipes/grpo_tiny.yaml", f"output_dir={run}",
                             *TINY, "train.steps=2000", "train.checkpoint_every=2"], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            # a pytest-xdist worker ignores SIGINT, and an ignored signal stays ignored across exec
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        latest = run / "checkpoints" / "latest"
        deadline = time.time() + 300
        while time.time() < deadline and not latest.exists() and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    ckpt = (run / "checkpoints" / "latest").read_text()
    done = max(r["step"] for r in metrics(run))
    assert last == (f"interrupted after step {done}; checkpoint {ckpt} is intact; resume with "
                    f"`lowalign run {run}`"), last
    assert not (run / ".lock").exists()
