"""ESSA end to end: a small run, exact resume, PEFT export, and 2 processes == 1 process."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from .helpers import REPO, cli, metrics, summary

SMALL = ["train.population_size=4", "train.prompts_per_generation=8", "eval.num_examples=16",
         "eval.batch_size=16", "threads=1", "model.quantization=none"]


def _adapter(run):
    return load_file(str(run / "adapters" / "policy" / "adapter_model.safetensors"))


def test_essa_small_run_and_peft_export(tmp_path):
    out = tmp_path / "es"
    cli("run", "recipes/es_tiny.yaml", f"output_dir={out}", "train.generations=3", *SMALL)
    s = summary(out)
    assert s["generations"] == 3 and s["num_singular_values"] == 14 * 16 and s["sigma"] >= 0.03
    assert s["inference_peak_memory_bytes"] > 0 and s["peak_memory_ratio_to_inference"] >= 1.0
    rows = metrics(out)
    assert {"fitness/mean", "fitness/max", "fitness/min", "fitness/std", "update_norm", "evals_per_s"} <= rows[0].keys()
    assert any(r["update_norm"] > 0 for r in rows)  # the population differed and the values moved
    w = _adapter(out)
    a = next(v for k, v in w.items() if "lora_A" in k)
    torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-5, rtol=0)  # A = V^T, orthonormal rows
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowalign.tiny import TINY_DIR

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_DIR), out / "adapters" / "policy")


def test_essa_resume_is_exact(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    cli("run", "recipes/es_tiny.yaml", f"output_dir={full}", "train.generations=4", *SMALL)
    cli("run", "recipes/es_tiny.yaml", f"output_dir={part}", "train.generations=2", "train.checkpoint_every=2",
        *SMALL)
    cli("run", "recipes/es_tiny.yaml", f"output_dir={part}", "train.generations=4", "resume=true", *SMALL)
    assert summary(full)["theta"] == summary(part)["theta"]
    assert [r["fitness/mean"] for r in metrics(full)] == [r["fitness/mean"] for r in metrics(part)]


def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["recipes/es_tiny.yaml", "train.generations=3", *SMALL]
    cli("run", *args, f"output_dir={one}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "lowalign", "run", *args, f"output_dir={two}"], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    s1, s2 = summary(one), summary(two)
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    assert s1["theta"] == s2["theta"]  # bit-identical singular values
    assert s2["ranks_identical"] is True  # every rank ends with the same parameters (checksums gathered)
    assert not (two / ".rank1").exists()  # rank 0 alone writes the run directory
    a, b = _adapter(one), _adapter(two)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["fitness/mean"] for r in metrics(one)] == [r["fitness/mean"] for r in metrics(two)]
