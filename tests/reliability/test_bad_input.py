"""Every bad input is a clear error naming the field or file, exits non-zero, loads no weights and leaves no
run directory behind."""

import json
import os
import subprocess
import sys

import pytest

from ..algorithms.helpers import REPO, cli

CONFIG_CASES = {  # override -> what the message must say
    "lora.r=0": r"lora\.r: 0 is out of range \(must be >= 1\)",
    "train.temperature=0": r"train\.temperature: 0(\.0)? is out of range \(must be > 0\)",
    "train.optim.learning_rate=-1": r"train\.optim\.learning_rate: -1(\.0)? is out of range \(must be > 0\)",
    "eval.num_examples=-5": r"eval\.num_examples: -5 is out of range \(must be >= 0\)",
    "train.num_generations=1": r"train\.num_generations: GRPO needs at least 2",
    "train.micro_batch_size=7": r"train\.micro_batch_size: 7 does not divide the batch of 128",
    "train.max_new_tokens=0": r"train\.max_new_tokens: 0 is out of range \(must be >= 1\)",
    "lora.target_modules=[q_prj]": r"lora\.target_modules: \['q_prj'\] match no module of LlamaForCausalLM",
}


def _assert_clean_failure(p, pattern, run_dir):
    import re

    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert re.search(pattern, p.stderr), p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Loading weights" not in p.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("override", sorted(CONFIG_CASES))
def test_config_errors_in_validate_and_run(tmp_path, override):
    p = cli("validate", "recipes/grpo_tiny.yaml", override, check=False)
    _assert_clean_failure(p, CONFIG_CASES[override], tmp_path / "run")
    p = cli("run", "recipes/grpo_tiny.yaml", override, f"output_dir={tmp_path / 'run'}", check=False)
    _assert_clean_failure(p, CONFIG_CASES[override], tmp_path / "run")


def test_scientific_notation_everywhere(tmp_path):
    from lowalign.api import load_config

    cfg = load_config(REPO / "recipes" / "grpo_tiny.yaml", ["train.optim.learning_rate=1e-5", "train.beta=4E-2"])
    assert cfg.train.optim.learning_rate == 1e-5 and cfg.train.beta == 0.04
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "grpo_tiny.yaml").read_text().replace("learning_rate: 0.001",
                                                                                 "learning_rate: 3e-4"))
    assert load_config(recipe).train.optim.learning_rate == 3e-4
    assert cli("validate", str(recipe), "train.optim.learning_rate=2e-5").returncode == 0


def test_empty_recipe_says_what_a_recipe_needs(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    p = cli("run", str(empty), f"output_dir={tmp_path / 'run'}", check=False)
    _assert_clean_failure(p, r"the recipe is empty.*algorithm: grpo", tmp_path / "run")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"prompt": f"Q: {i}+1= A:", "answer": str(i + 1)} for i in range(40)]


def _data_case(tmp_path, kind):
    """(file, extra overrides, expected message) for one kind of malformed data."""
    if kind == "bad_json_line":
        f = tmp_path / "d.jsonl"
        f.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n{\"prompt\": \"x\", answer: 3}\n")
        return f, [], r"d\.jsonl:3: invalid JSON at column"
    if kind == "not_utf8":
        f = tmp_path / "d.jsonl"
        f.write_bytes(b'{"prompt": "ok", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
        return f, [], r"d\.jsonl:2: not UTF-8 text \(byte b'\\xe9'"
    if kind == "empty":
        f = tmp_path / "d.jsonl"
        f.write_text("")
        return f, [], r"d\.jsonl is empty"
    if kind == "missing_column":
        return _jsonl(tmp_path / "d.jsonl", [{"question": r["prompt"]} for r in GOOD]), [], \
            r"missing column 'prompt'; available: \['question'\]"
    if kind == "huge_prompt":
        rows = GOOD + [{"prompt": "x" * 5_000_000, "answer": "0"}]
        return _jsonl(tmp_path / "d.jsonl", rows), ["data.max_prompt_tokens=64"], \
            r"1 of \d+ (train|eval) prompts exceed data\.max_prompt_tokens=64"
    if kind == "not_parquet":
        f = tmp_path / "d.parquet"
        f.write_text("this is not parquet\n")
        return f, [], r"could not read .*d\.parquet as parquet"
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["bad_json_line", "not_utf8", "empty", "missing_column", "huge_prompt",
                                  "not_parquet"])
def test_malformed_prompt_data(tmp_path, kind):
    f, extra, pattern = _data_case(tmp_path, kind)
    p = cli("run", "recipes/grpo_tiny.yaml", f"data.path={f}", f"output_dir={tmp_path / 'run'}", *extra, check=False)
    _assert_clean_failure(p, pattern, tmp_path / "run")


def test_preference_pair_with_chosen_equal_rejected(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(30)]
    rows[7]["rejected"] = rows[7]["chosen"]
    f = _jsonl(tmp_path / "pairs.jsonl", rows)
    p = cli("run", "recipes/dpo_ultrafeedback.yaml", "model.name_or_path=builtin:tiny", f"data.path={f}",
            f"output_dir={tmp_path / 'run'}", check=False)
    _assert_clean_failure(p, r"1 of 30 pairs have chosen == rejected \(first: row 8", tmp_path / "run")


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    p = cli("run", "recipes/grpo_tiny.yaml", f"output_dir={blocker / 'run'}", check=False)
    assert p.returncode == 2 and f"{blocker} is a file, not a directory" in p.stderr
    assert "Loading weights" not in p.stderr


def test_second_run_on_a_live_run_directory_fails_naming_the_holder(tmp_path):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                               "started": "2026-11-25 06:00:00"}))
        p = cli("run", "recipes/grpo_tiny.yaml", f"output_dir={run}", "train.steps=1", check=False)
        assert p.returncode == 2 and f"in use by another run (pid {holder.pid} on {socket.gethostname()}" in p.stderr
        assert "Loading weights" not in p.stderr and sorted(os.listdir(run)) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale and the next run takes it over
    p = cli("run", "recipes/grpo_tiny.yaml", f"output_dir={run}", "train.steps=1", "eval.num_examples=4",
            "train.prompts_per_step=2", "train.num_generations=2", check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "taking over the stale lock" in p.stderr and not (run / ".lock").exists()


def test_a_zombie_holder_is_gone():
    """A SIGKILLed run whose parent died too (torchrun's agent killed with its ranks) is a zombie until init reaps
    it: its lock is stale, not "in use by another run"."""
    import signal
    import socket
    import time

    from lowalign.runtime import RunLock

    def state(pid):
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    info = {"pid": child.pid, "host": socket.gethostname()}
    try:
        assert RunLock._alive(info)
        child.send_signal(signal.SIGKILL)
        deadline = time.time() + 10
        while time.time() < deadline and state(child.pid) != "Z":  # not reaped (no wait() yet): a zombie
            time.sleep(0.01)
        assert state(child.pid) == "Z" and not RunLock._alive(info)
    finally:
        child.kill()
        child.wait()
    assert not RunLock._alive(info)  # reaped: no such process
