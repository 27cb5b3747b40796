"""GRPO end to end through the real CLI: outputs, exact resume after SIGKILL, bad rewards, real-model path."""

import json

import pytest

from .helpers import cli, kill_after_checkpoint, metrics, same_adapters, summary

SMALL = ["eval.num_examples=40", "train.prompts_per_step=4", "train.num_generations=4", "threads=1"]
DETERMINISTIC_KEYS = ("reward", "loss", "grad_norm", "kl", "clip_ratio/region", "completion_length")


def test_grpo_tiny_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    p = cli("run", "recipes/grpo_tiny.yaml", f"output_dir={out}", "train.steps=4", "train.checkpoint_every=2",
            "train.beta=0.04", "train.num_iterations=2", "train.micro_batch_size=8", *SMALL)
    assert str(out) in p.stderr and "lowalign results" in p.stderr
    s = summary(out)
    assert {"baseline", "final", "wall_time_s", "peak_memory_bytes"} <= s.keys()
    assert 0 <= s["baseline"]["accuracy"] <= 1 and 0 <= s["final"]["accuracy"] <= 1 and s["peak_memory_bytes"] > 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["kl"] >= 0 for r in rows) and rows[-1]["kl"] > 0  # reference pass ran (beta > 0)
    assert any(r["clip_ratio/region"] >= 0 for r in rows) and "rewards/correctness_reward" in rows[0]
    assert (out / "adapters" / "policy" / "adapter_model.safetensors").exists()
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "latest").read_text() == "step_000004"


def test_same_seed_same_numbers(tmp_path):
    runs = []
    for name in ("a", "b"):
        cli("run", "recipes/grpo_tiny.yaml", f"output_dir={tmp_path / name}", "train.steps=2", *SMALL)
        runs.append(metrics(tmp_path / name))
    strip = lambda rows: [{k: r[k] for k in DETERMINISTIC_KEYS if k in r} for r in rows]
    assert strip(runs[0]) == strip(runs[1])


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    args = ["recipes/grpo_tiny.yaml", "train.steps=8", "train.checkpoint_every=2", *SMALL]
    full, killed = tmp_path / "full", tmp_path / "killed"
    cli("run", *args, f"output_dir={full}")

    kill_after_checkpoint(args, killed, "step_000004", "step_000008")

    cli("run", str(killed))  # resume by pointing at the run directory
    assert same_adapters(full, killed, "policy")
    ma, mb = metrics(full), metrics(killed)
    assert [r["step"] for r in mb] == list(range(1, 9))
    for ra, rb in zip(ma, mb):
        assert {k: ra.get(k) for k in DETERMINISTIC_KEYS} == {k: rb.get(k) for k in DETERMINISTIC_KEYS}
    assert summary(full)["final"]["accuracy"] == summary(killed)["final"]["accuracy"]


BAD_REWARDS = {
    "raises": ("def r(prompts, completions, **kw):\n    raise KeyError('oops')\n", "raised KeyError"),
    "short": ("def r(prompts, completions, **kw):\n    return [1.0]\n", "returned 1 values for"),
    "nan": ("def r(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n",
            "returned a non-finite value"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REWARDS))
def test_bad_reward_stops_with_a_clear_error(tmp_path, kind):
    src, msg = BAD_REWARDS[kind]
    (tmp_path / f"badrw_{kind}.py").write_text(src)
    p = cli("run", "recipes/grpo_tiny.yaml", f"output_dir={tmp_path / 'run'}", "train.steps=2",
            f"rewards=[{{fn: 'badrw_{kind}:r'}}]", *SMALL, env={"PYTHONPATH": str(tmp_path)}, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"reward function 'r' {msg}" in p.stderr and "prompt='Q: " in p.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert "Loading weights" not in p.stderr and "baseline" not in p.stderr  # caught before the model loads


def test_real_model_path_qwen2_gsm8k_file(tmp_path, tiny_qwen2_dir):
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many?",
             "answer": f"He has {a}+{b}={a + b} apples.\n#### {a + b}"} for a in range(3, 40) for b in (2, 5)]
    f = tmp_path / "gsm8k.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cli("run", "recipes/grpo_qwen_gsm8k.yaml", f"output_dir={out}", f"model.name_or_path={tiny_qwen2_dir}",
        "model.quantization=nf4", "model.device=cpu", "model.dtype=float32", "data.source=local",
        f"data.path={f}", "data.chat_template=false", "train.steps=2", "train.max_new_tokens=8",
        "eval.num_examples=6", "eval.max_new_tokens=8", *SMALL[1:])
    s = summary(out)
    assert s["baseline"]["n"] == 6 and len(metrics(out)) == 2


KEYWORD_REWARD = '''
def has_seven(prompts, completions, **columns):
    return [float("7" in c) for c in completions]


def short(prompts, completions, **columns):
    return [1.0 - min(len(c), 8) / 8 for c in completions]
'''


def test_prompt_only_keyword_task_reports_heldout_reward(tmp_path):
    """Your own task: a prompt-only file and your own reward functions. No answer column and no checker, so
    no accuracy; held-out mean reward (per source and total) before and after, in summary.json and table."""
    (tmp_path / "kwrw.py").write_text(KEYWORD_REWARD)
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q: {i}+{i}= A:"}) + "\n" for i in range(60)))
    out = tmp_path / "run"
    p = cli("run", "recipes/grpo_tiny.yaml", f"output_dir={out}", f"data.path={f}", "train.steps=2",
            "rewards=[{fn: 'kwrw:has_seven', weight: 1.0}, {fn: 'kwrw:short', weight: 0.5}]", "eval.num_examples=6",
            *SMALL[1:], env={"PYTHONPATH": str(tmp_path)})
    s = summary(out)
    for part in ("baseline", "final"):
        assert {"reward", "reward/has_seven", "reward/short", "n"} <= s[part].keys() and "accuracy" not in s[part]
        r = s[part]
        assert r["reward"] == pytest.approx(r["reward/has_seven"] + 0.5 * r["reward/short"], abs=1e-6)
        assert r["n"] == 6
    table = p.stderr[p.stderr.index("lowalign results"):]
    assert "reward/has_seven" in table and "accuracy" not in table
    assert all("reward" in smp and "correct" not in smp for smp in s["final_samples"])
