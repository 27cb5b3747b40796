import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args, timeout=600, env=None, check=True, cwd=REPO):
    """Run the real CLI in its own process (the way users do), in the repository (or ``cwd``): forked from a
    server that has the imports done (``tests/forked_cli.py``), or a subprocess when the environment changes a
    variable read at import time (``forked_cli.forked_ok``)."""
    from tests import forked_cli

    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    argv = list(map(str, args))
    if forked_cli.forked_ok(e):
        p = forked_cli.run(argv, e, cwd, timeout)
    else:
        p = subprocess.run([sys.executable, "-m", "lowalign", *argv], capture_output=True, text=True,
                           timeout=timeout, env=e, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"lowalign {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def metrics(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def torchrun(nproc: int, *args, timeout=600):
    """``torchrun --nproc_per_node NPROC -m lowalign ARGS`` (one thread per process): each rank forked with
    torchrun's variables (``forked_cli.run_ranks``) when the environment allows, else torchrun itself."""
    from tests import forked_cli

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    argv = list(map(str, args))
    if forked_cli.forked_ok(env):
        p = forked_cli.run_ranks(nproc, argv, env, REPO, timeout)
    else:
        p = subprocess.run([*TORCHRUN, str(nproc), "-m", "lowalign", *argv], capture_output=True, text=True,
                           timeout=timeout, env=env, cwd=REPO)
    if p.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    from lowalign.runtime import proc_stat

    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        fields = proc_stat(int(d.name))
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _running(pid: int) -> bool:
    from lowalign.runtime import proc_stat

    return proc_stat(pid)[0] not in ("Z", "X", "?")


def kill_after_checkpoint(args, run_dir, at_least: str, last: str, timeout: float = 300, nproc: int = 0) -> None:
    """Start ``lowalign run ARGS output_dir=RUN_DIR`` (under torchrun with ``nproc`` processes when > 0),
    SIGKILL every process of the run (its process group, and under torchrun each rank's, since torchrun starts
    ranks in sessions of their own) once checkpoint ``at_least`` (e.g. ``step_000004``) is the latest, and check
    that none outlived the kill and that it had not yet written checkpoint ``last``."""
    import signal
    import time

    from tests import forked_cli

    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if nproc else {})}
    argv = ["run", *map(str, args), f"output_dir={run_dir}"]
    if not nproc and forked_cli.forked_ok(env):  # its own session too (forked_cli)
        proc, *outs = forked_cli.start(argv, env, REPO)
        running, wait = proc.is_alive, proc.join
    else:
        launch = [*TORCHRUN, str(nproc)] if nproc else [sys.executable]
        proc = subprocess.Popen([*launch, "-m", "lowalign", *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        running, wait, outs = (lambda: proc.poll() is None), proc.wait, []
    latest = Path(run_dir) / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= at_least):
        if not running():
            break
        time.sleep(0.05)
    ranks = _descendants(proc.pid)  # torchrun starts each rank in its own session: kill those groups too
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # a rank is its session's leader: the group is the rank and its own children
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_running(pid) for pid in ranks):
        time.sleep(0.05)
    assert not any(_running(pid) for pid in ranks), "a rank outlived the kill"
    for f in outs:
        os.unlink(f)
    assert latest.read_text() < last, "the run finished before it could be killed"
    assert not (Path(run_dir) / "summary.json").exists()


def same_adapters(dir_a, dir_b, name: str) -> bool:
    from safetensors.torch import load_file

    a = load_file(str(Path(dir_a) / "adapters" / name / "adapter_model.safetensors"))
    b = load_file(str(Path(dir_b) / "adapters" / name / "adapter_model.safetensors"))
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STEP = ["train.steps=1", "eval.num_examples=4", "eval.max_new_tokens=4", "threads=1", "train.checkpoint_every=0"]


def one_grpo_and_one_dpo_step(model: str, out, *extra) -> None:
    """One GRPO step (beta > 0) and one DPO step on ``model``: policy == reference at step 1 (fresh LoRA, dropout
    off), so GRPO's KL is exactly 0 and DPO's loss is ln 2."""
    import math

    import pytest

    out = Path(out)
    cli("run", "recipes/grpo_tiny.yaml", f"model.name_or_path={model}", f"output_dir={out / 'grpo'}",
        "train.beta=0.04", "train.prompts_per_step=2", "train.num_generations=2", "train.max_new_tokens=4",
        *STEP, *extra)
    assert metrics(out / "grpo")[0]["kl"] == 0.0
    cli("run", "recipes/dpo_tiny.yaml", f"model.name_or_path={model}", f"output_dir={out / 'dpo'}",
        "data.pairs=correctness", "data.num_pairs=16", "train.eval_pairs=4", "train.batch_size=4", *STEP, *extra)
    assert metrics(out / "dpo")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def length_confidence(text: str):
    """A stand-in confidence parser for PPO-C tests (the tiny model states none): the completion's length mod 5,
    in quarters; None for an empty completion."""
    return None if not text.strip() else (len(text.strip()) % 5) / 4


def roles_used(monkeypatch, recipe: str, overrides: list[str]) -> list[str]:
    """Every role a run of ``recipe`` switches the bundle to (``ModelBundle.use`` recorded), run in-process."""
    from lowalign import api
    from lowalign.bundle import ModelBundle

    roles, use = [], ModelBundle.use

    def recording_use(self, role):
        roles.append(role)
        return use(self, role)

    monkeypatch.setattr(ModelBundle, "use", recording_use)
    api.run(recipe, overrides, quiet=True)
    monkeypatch.setattr(ModelBundle, "use", use)
    return roles
