import subprocess
import sys
from pathlib import Path

import pytest

from lowalign import config as C

REPO = Path(__file__).resolve().parents[1]


def test_misspelled_key_names_it_and_suggests():
    with pytest.raises(C.ConfigError, match=r"unknown key 'train\.num_generatoins'.*'num_generations'"):
        C.from_dict({"algorithm": "grpo", "train": {"num_generatoins": 4}})
    with pytest.raises(C.ConfigError, match=r"unknown key 'modle'.*'model'"):
        C.from_dict({"modle": {}})


def test_wrong_type_names_field():
    with pytest.raises(C.ConfigError, match=r"train\.steps: expected an integer"):
        C.from_dict({"algorithm": "grpo", "train": {"steps": "many"}})
    with pytest.raises(C.ConfigError, match=r"model\.quantization: 'nf5' is not one of.*'nf4'"):
        C.from_dict({"model": {"quantization": "nf5"}})
    with pytest.raises(C.ConfigError, match=r"rewards\[0\]\.weight: expected a number"):
        C.from_dict({"rewards": [{"fn": "lowalign.tasks.arithmetic:format_reward", "weight": "x"}]})


def test_missing_files_and_bad_imports():
    with pytest.raises(C.ConfigError, match=r"data\.path: file or directory not found"):
        C.from_dict({"data": {"path": "/nonexistent/x.jsonl"}})
    with pytest.raises(C.ConfigError, match=r"model\.name_or_path: directory not found"):
        C.from_dict({"model": {"name_or_path": "./no/such/model"}})
    with pytest.raises(C.ConfigError, match=r"rewards\[0\]\.fn: .*no callable 'nope'"):
        C.from_dict({"rewards": [{"fn": "lowalign.tasks.arithmetic:nope"}]})
    with pytest.raises(C.ConfigError, match=r"algorithm: unknown 'grop'.*'grpo'"):
        C.from_dict({"algorithm": "grop"})


def test_overrides_and_defaults():
    cfg = C.from_dict({"algorithm": "grpo"}, ["train.optim.learning_rate=0.01", "model.quantization=nf4",
                                              "lora.target_modules=[q_proj]"])
    assert cfg.train.optim.learning_rate == 0.01 and cfg.model.quantization == "nf4"
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.train.num_generations == 8  # default kept
    with pytest.raises(C.ConfigError, match="key.sub=value"):
        C.from_dict({}, ["nonsense"])


def test_every_field_has_help():
    from lowalign.algorithms import GRPOConfig, SFTConfig

    for cls in (C.RunConfig, GRPOConfig, SFTConfig):
        for key, _, help_ in C.describe(cls):
            assert help_, f"{cls.__name__}.{key} has no help string"


def test_list_index_overrides():
    cfg = C.from_dict({"rewards": [{"fn": "lowalign.tasks.arithmetic:format_reward"}]}, ["rewards.0.weight=2.5"])
    assert cfg.rewards[0].weight == 2.5
    with pytest.raises(C.ConfigError, match="not an index of a list of 1"):
        C.from_dict({"rewards": [{"fn": "lowalign.tasks.arithmetic:format_reward"}]}, ["rewards.3.weight=1"])


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate_and_show_command(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in recipes resolve against an empty directory
    raw = C.load_raw(recipe)
    missing = [(f"rewards.{i}.path", rf"rewards\[{i}\]\.path") for i, r in enumerate(raw.get("rewards") or [])
               if r.get("path")]  # built by another recipe
    if (raw.get("data") or {}).get("path"):
        missing.append(("data.path", r"data\.path"))  # the user's own file
    overrides = []
    for key, pattern in missing:  # each absence is reported by name, then a stand-in lets validation go on
        with pytest.raises(C.ConfigError, match=pattern + ": file or directory not found"):
            C.load(recipe, overrides)
        stand_in = tmp_path / key
        stand_in.write_text("")
        overrides.append(f"{key}={stand_in}")
    C.load(recipe, overrides)
    head = recipe.read_text().splitlines()[:4]
    assert any(f"lowalign run recipes/{recipe.name}" in ln for ln in head), "header must show the command"


def test_validate_cli_fails_before_loading_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: grpo\ntrain:\n  lerning_rate: 0.1\n")
    code = ("import sys; from lowalign.cli import main; rc = main(['validate', sys.argv[1]]);"
            "print('TORCH_LOADED' if 'transformers' in sys.modules else 'CLEAN'); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True)
    assert p.returncode == 2
    assert "unknown key 'train.lerning_rate'" in p.stderr
    assert "CLEAN" in p.stdout  # no model library was even imported
