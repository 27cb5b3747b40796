"""`--profile-memory`: each phase's own peak (the counter resets per phase), per step and in summary.json."""

import pytest
import torch

from lowalign.runtime import PHASES, MemoryPhases, peak_memory_bytes
from tests.algorithms.helpers import REPO, cli, metrics, summary


def test_each_phase_has_its_own_peak():
    mp = MemoryPhases()
    mp.start("cpu", True)
    with mp.phase("big"):
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    with mp.phase("small"):
        y = torch.ones(8 * 2**20 // 4)
        del y
    s = mp.summary()["peak_mib"]
    assert s["big"] - s["small"] > 40, s  # the big tensor's pages count in its phase only
    step = mp.step_metrics()
    assert step == {"memory/big_mib": s["big"], "memory/small_mib": s["small"]}
    assert mp.step_metrics() == {}  # per step: emptied once read
    assert mp.overall >= s["big"] * 2**20 - 2**20


def test_after_load_is_read_before_the_load_peak(monkeypatch):
    """Memory that grows between the phase's two reads (the resident set, then the peak) must not put the
    after-load figure above the load peak: the resident set is read first. A CI run saw 349.6 > 349.5 MiB
    when the peak was read first."""
    reads = iter(range(100, 200))  # the process grows by one unit between any two reads
    mp = MemoryPhases()
    mp.start("cpu", True)
    monkeypatch.setattr(mp, "_reset", lambda: None)
    monkeypatch.setattr(mp, "_now", lambda: next(reads))
    monkeypatch.setattr(mp, "_peak", lambda: next(reads))  # VmHWM: at least the resident set at its read
    with mp.phase("load"):
        pass
    assert 0 < mp.after_load <= mp.peaks["load"]


def test_off_is_a_no_op():
    mp = MemoryPhases()
    with mp.phase("x"):
        pass
    assert mp.summary() == {} and mp.step_metrics() == {}

def test_off_on_a_cpu_still_hands_the_heap_back_at_each_phase(monkeypatch):
    import lowalign.runtime as rt

    trims = []
    monkeypatch.setattr(rt, "release_cpu_memory", lambda: trims.append(1))
    mp = MemoryPhases()
    mp.start("cpu", False)
    for name in ("rollout", "scoring", "scoring", "forward_backward", "forward_backward", "optimizer"):
        with mp.phase(name):
            pass
    assert len(trims) == 6  # between the micro-batches of one phase too
    assert mp.summary() == {}


def test_grpo_and_dpo_runs_report_phases(tmp_path):
    g, d = tmp_path / "g", tmp_path / "d"
    cli("run", "recipes/grpo_tiny.yaml", "--profile-memory", "train.steps=2", "eval.num_examples=20",
        f"output_dir={g}")
    cli("run", "recipes/dpo_tiny.yaml", "--profile-memory", "train.steps=2", "data.num_pairs=64",
        "train.eval_pairs=16", "train.batch_size=8", "eval.num_examples=20", f"output_dir={d}")
    for run, phases in ((g, {"load", "evaluation", "rollout", "scoring", "forward_backward", "optimizer"}),
                        (d, {"load", "evaluation", "reference", "forward_backward", "optimizer"})):
        s = summary(run)
        mp = s["memory_by_phase"]
        assert phases <= set(mp["peak_mib"]), mp
        assert mp["peak_mib"][mp["largest_phase"]] == max(mp["peak_mib"].values())
        # the run's peak is the largest phase's (within the bytes that ran between phases)
        assert s["peak_memory_bytes"] >= max(mp["peak_mib"].values()) * 2**20 - 2**20
        assert 0 < mp["after_load_mib"] <= mp["peak_mib"]["load"]
        rows = metrics(run)
        assert all(r.get("memory/forward_backward_mib", 0) > 0 for r in rows)
    assert "time/objective_setup_s" in summary(d)
    assert PHASES.enabled is False and peak_memory_bytes(torch.device("cpu")) > 0


def test_cpu_peak_is_the_runs_own_not_its_large_parents():
    """A run started by a large process (a test worker, a notebook kernel) reports its own peak: Linux carries
    ru_maxrss over from the parent at fork, VmHWM starts again at exec."""
    import subprocess
    import sys

    import numpy as np

    big = np.ones(256 * 2**20, dtype=np.float64)  # 2 GiB resident in this process
    code = "import torch; from lowalign.runtime import peak_memory_bytes; print(peak_memory_bytes(torch.device('cpu')))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(p.stdout) < 1.5 * 2**30, int(p.stdout) / 2**20
    del big


def test_profile_memory_without_a_peak_reset_is_a_config_error(tmp_path, monkeypatch):
    """On a CPU without /proc/self/clear_refs (not Linux) --profile-memory is refused by name, before any
    model loads or the run directory exists."""
    import pytest

    import lowalign
    from lowalign import runtime
    from lowalign.config import ConfigError

    monkeypatch.setattr(runtime, "CLEAR_REFS", tmp_path / "no_clear_refs")
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="profile_memory"):
        lowalign.run(REPO / "recipes/grpo_tiny.yaml", ["profile_memory=true", "model.device=cpu", f"output_dir={out}"],
                     quiet=True)
    assert not out.exists()
    with pytest.raises(ConfigError, match="profile_memory"):
        MemoryPhases().start("cpu", True)
    MemoryPhases().start("cpu", False)  # off: nothing to check


def test_gptq_calibration_is_a_phase_of_its_own(tmp_path, monkeypatch):
    """The planner plans GPTQ's calibration apart (its float64 Hessians can be a run's peak), so the run
    measures it apart from loading."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("LOWALIGN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "g"
    cli("run", "recipes/grpo_tiny.yaml", "--profile-memory", "model.quantization=nf4", "model.gptq_rows=32",
        "train.steps=1", "eval.num_examples=0", f"output_dir={run}")
    mp = summary(run)["memory_by_phase"]
    assert {"load", "calibration", "rollout"} <= set(mp["peak_mib"]), mp
    assert mp["peak_mib"]["calibration"] > 0
