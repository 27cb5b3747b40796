"""DPO end to end on the tiny model: pairs, cached reference log-probs, precompute == per-step reference."""

import json

from .helpers import cli, metrics, summary

SMALL = ["data.num_pairs=64", "train.eval_pairs=32", "eval.num_examples=40", "train.batch_size=8",
         "train.checkpoint_every=0", "threads=1"]


def test_dpo_tiny_run(tmp_path):
    out = tmp_path / "runs" / "dpo"
    cli("run", "recipes/dpo_tiny.yaml", f"output_dir={out}", "train.steps=6", *SMALL)
    s = summary(out)
    assert s["baseline"]["preference_accuracy"] == 0.5 and 0 <= s["final"]["preference_accuracy"] <= 1
    assert {"accuracy", "preference_accuracy"} <= s["final"].keys()
    pairs = json.loads((out / "pairs.json").read_text())
    assert len(pairs["train"]) >= 32 and {"onpolicy", "near_miss"} >= {p["source"] for p in pairs["train"]}
    assert all(p["chosen"] != p["rejected"] for p in pairs["train"])
    assert list(out.glob("ref_logps-*.safetensors")) and not (tmp_path / "runs" / ".lowalign-cache").exists()
    rows = metrics(out)
    assert len(rows) == 6 and all(0 <= r["rewards/accuracy"] <= 1 for r in rows)
    assert s["memory"]["adapter:policy"] > 0 and "adapter:reward" not in s["memory"]


def test_precomputed_reference_equals_per_step_reference(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cli("run", "recipes/dpo_tiny.yaml", f"output_dir={a}", "train.steps=2", "train.precompute_ref=true", *SMALL)
    cli("run", "recipes/dpo_tiny.yaml", f"output_dir={b}", "train.steps=2", "train.precompute_ref=false", *SMALL)
    ra, rb = metrics(a), metrics(b)
    for x, y in zip(ra, rb):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["rewards/margin"] - y["rewards/margin"]) < 1e-5


def test_dpo_on_ultrafeedback_format_file_with_qwen2(tmp_path, tiny_qwen2_dir):
    rows = [{"prompt": f"Say something nice {i}",
             "chosen": [{"role": "user", "content": f"Say something nice {i}"},
                        {"role": "assistant", "content": "You are great."}],
             "rejected": [{"role": "user", "content": f"Say something nice {i}"},
                          {"role": "assistant", "content": "No."}]} for i in range(40)]
    f = tmp_path / "uf.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo_uf"
    cli("run", "recipes/dpo_ultrafeedback.yaml", f"output_dir={out}", f"model.name_or_path={tiny_qwen2_dir}",
        f"data.path={f}", "model.device=cpu", "model.dtype=float32", "train.steps=3", "train.batch_size=4",
        "train.eval_pairs=8", "train.checkpoint_every=0", "threads=1")
    s = summary(out)
    assert s["pairs"] == 36 and s["baseline"]["preference_accuracy"] == 0.5
    assert "accuracy" not in s["final"]  # no task to check answers against: preference metrics only
    pairs = json.loads((out / "pairs.json").read_text())
    assert pairs["train"][0]["chosen"] == "You are great." and "Say something nice" in pairs["train"][0]["prompt"]


def test_dpo_missing_column_fails_before_loading_the_model(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "p", "good": "a", "bad": "b"}) + "\n")
    p = cli("run", "recipes/dpo_ultrafeedback.yaml", f"output_dir={tmp_path / 'x'}", "model.name_or_path=builtin:tiny",
            f"data.path={f}", check=False)
    assert p.returncode == 2 and "missing column(s) ['chosen', 'rejected']" in p.stderr
    assert "Loading weights" not in p.stderr
