"""Checkpoints and caches without pickle, a full disk, and content-keyed DPO reference caches."""

import errno
import json
import subprocess

import pytest
import torch

from ..algorithms.helpers import REPO, cli, metrics

TINY = ["eval.num_examples=4", "train.prompts_per_step=2", "train.num_generations=2", "threads=1"]


def test_no_pickle_anywhere_in_the_package():
    p = subprocess.run(["grep", "-rn", r"torch.load\|pickle", "lowalign", "kernels"], cwd=REPO, capture_output=True,
                       text=True)
    hits = [ln for ln in p.stdout.splitlines() if "trainer.pt" not in ln]  # the tested legacy refusal only
    assert hits == [], hits


def test_checkpoint_is_json_and_safetensors_and_old_pickles_are_refused(tmp_path):
    run = tmp_path / "run"
    cli("run", "recipes/grpo_tiny.yaml", f"output_dir={run}", "train.steps=2", "train.checkpoint_every=2", *TINY)
    ckpt = run / "checkpoints" / "step_000002"
    names = sorted(p.name for p in ckpt.iterdir())
    assert {"trainer.json", "trainer.safetensors", "state.json"} <= set(names)
    assert not [n for n in names if n.endswith((".pt", ".pkl", ".bin"))]
    tree = json.loads((ckpt / "trainer.json").read_text())
    assert {"optimizer", "scheduler", "rng", "extra"} <= tree.keys()
    # a checkpoint from an earlier version: a pickle is refused, not executed
    (ckpt / "trainer.json").unlink()
    (ckpt / "trainer.safetensors").unlink()
    torch.save({"optimizer": None}, ckpt / "trainer.pt")
    p = cli("run", str(run), "train.steps=4", check=False)
    assert p.returncode == 2 and "written by an older lowalign as a pickle (trainer.pt)" in p.stderr
    assert "lora.init_from=" in p.stderr


def test_disk_full_while_checkpointing_keeps_the_last_good_one(tmp_path, monkeypatch):
    """ENOSPC injected into the writer at the second checkpoint: a clear error, step 2 intact, resume works."""
    import lowalign
    from lowalign import runtime

    real, calls = runtime.save_tree, []

    def flaky(obj, directory, name):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, directory, name)

    monkeypatch.setattr(runtime, "save_tree", flaky)
    run = tmp_path / "run"
    args = [f"output_dir={run}", "train.steps=6", "train.checkpoint_every=2", *TINY]
    with pytest.raises(runtime.CheckpointError, match=r"step 4 .*No space left on device.*step_000002, is intact"):
        lowalign.run("recipes/grpo_tiny.yaml", args, quiet=True)
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"
    assert not list((run / "checkpoints").glob(".tmp_*"))  # no half-written checkpoint left behind
    assert not (run / ".lock").exists()
    monkeypatch.setattr(runtime, "save_tree", real)
    s = lowalign.run(str(run), quiet=True)  # resumes from step 2
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6] and s["final"]["n"] == 4


def test_dpo_reference_recomputed_when_weights_change_at_the_same_path(tmp_path, tiny_llama_dir):
    import shutil

    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    cache = tmp_path / "cache"
    args = ["recipes/dpo_tiny.yaml", f"model.name_or_path={model}", f"train.reference_cache_dir={cache}",
            "train.steps=1", "data.pairs=correctness", "data.num_pairs=16", "train.eval_pairs=4",
            "train.batch_size=4", "eval.num_examples=4", "threads=1"]
    cli("run", *args, f"output_dir={tmp_path / 'a'}")
    first = sorted(cache.glob("ref_logps-*.safetensors"))  # training pairs and held-out pairs
    assert len(first) == 2
    cli("run", *args, f"output_dir={tmp_path / 'b'}")
    assert sorted(cache.glob("ref_logps-*.safetensors")) == first  # same content: the cache is reused
    torch.manual_seed(123)  # different weights, re-saved at the same path
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(model)
    cli("run", *args, f"output_dir={tmp_path / 'c'}")
    new = sorted(set(cache.glob("ref_logps-*.safetensors")) - set(first))
    assert len(new) == 2  # recomputed under new keys, not silently reused
    from safetensors.torch import load_file

    old_ref = {load_file(str(f))["ref_logps"].shape: load_file(str(f))["ref_logps"] for f in first}
    for f in new:
        t = load_file(str(f))["ref_logps"]
        assert not torch.equal(t, old_ref[t.shape])  # and the values differ: the new weights were scored
