import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowalign import config as C
from lowalign.api import config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_misspelled_key_names_it_and_suggests():
    with pytest.raises(C.ConfigError, match=r"unknown key 'train\.num_generatoins'.*'num_generations'"):
        config_from_dict({"algorithm": "grpo", "train": {"num_generatoins": 4}})
    with pytest.raises(C.ConfigError, match=r"unknown key 'modle'.*'model'"):
        config_from_dict({"modle": {}})


def test_wrong_type_names_field():
    with pytest.raises(C.ConfigError, match=r"train\.steps: expected an integer"):
        config_from_dict({"algorithm": "grpo", "train": {"steps": "many"}})
    with pytest.raises(C.ConfigError, match=r"model\.quantization: 'nf5' is not one of.*'nf4'"):
        config_from_dict({"model": {"quantization": "nf5"}})
    with pytest.raises(C.ConfigError, match=r"rewards\[0\]\.weight: expected a number"):
        config_from_dict({"rewards": [{"fn": "lowalign.tasks.arithmetic:format_reward", "weight": "x"}]})


def test_missing_files_and_bad_imports():
    with pytest.raises(C.ConfigError, match=r"data\.path: file or directory not found"):
        config_from_dict({"data": {"path": "/nonexistent/x.jsonl"}})
    with pytest.raises(C.ConfigError, match=r"model\.name_or_path: directory not found"):
        config_from_dict({"model": {"name_or_path": "./no/such/model"}})
    with pytest.raises(C.ConfigError, match=r"rewards\[0\]\.fn: .*no callable 'nope'"):
        config_from_dict({"rewards": [{"fn": "lowalign.tasks.arithmetic:nope"}]})
    with pytest.raises(C.ConfigError, match=r"algorithm: unknown 'grop'.*'grpo'"):
        config_from_dict({"algorithm": "grop"})


def test_overrides_and_defaults():
    cfg = config_from_dict({"algorithm": "grpo"}, ["train.optim.learning_rate=0.01", "model.quantization=nf4",
                                              "lora.target_modules=[q_proj]"])
    assert cfg.train.optim.learning_rate == 0.01 and cfg.model.quantization == "nf4"
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.train.num_generations == 8  # default kept
    with pytest.raises(C.ConfigError, match="key.sub=value"):
        config_from_dict({}, ["nonsense"])


def test_every_field_has_help():
    from lowalign.algorithms import algorithms

    for cls in (C.RunConfig, *(a.config for a in algorithms().values())):
        for key, _, help_ in C.describe(cls):
            assert help_, f"{cls.__name__}.{key} has no help string"


def test_list_index_overrides():
    cfg = config_from_dict({"rewards": [{"fn": "lowalign.tasks.arithmetic:format_reward"}]}, ["rewards.0.weight=2.5"])
    assert cfg.rewards[0].weight == 2.5
    with pytest.raises(C.ConfigError, match="not an index of a list of 1"):
        config_from_dict({"rewards": [{"fn": "lowalign.tasks.arithmetic:format_reward"}]}, ["rewards.3.weight=1"])


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_validate_and_show_command(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in recipes resolve against an empty directory
    raw = C.load_raw(recipe)
    rewards = raw.get("rewards") or []
    missing = [(f"rewards.{i}.{k}", rf"rewards\[{i}\]\.{k}") for i, r in enumerate(rewards)
               for k in ("path", "dpo_adapter") if r.get(k)]  # built by another recipe
    if (raw.get("data") or {}).get("path"):
        missing.append(("data.path", r"data\.path"))  # the user's own file
    if (raw.get("lora") or {}).get("init_from"):
        missing.append(("lora.init_from", r"lora\.init_from"))  # an adapter another recipe trains
    overrides = []
    for key, pattern in missing:  # each absence is reported by name, then a stand-in lets validation go on
        with pytest.raises(C.ConfigError, match=pattern + ": file or directory not found"):
            load_config(recipe, overrides)
        stand_in = tmp_path / key
        stand_in.write_text("")
        if key.startswith("rewards.") and rewards[int(key.split(".")[1])].get("attribute_weights"):
            stand_in.unlink()  # a reward run whose reward_meta.json names the weighted attributes
            stand_in.mkdir()
            names = list(rewards[int(key.split(".")[1])]["attribute_weights"])
            (stand_in / "reward_meta.json").write_text(json.dumps({"attributes": names}))
        if key.endswith(".dpo_adapter"):  # a finished DPO run: its saved policy adapter
            stand_in.unlink()
            (stand_in / "adapters" / "policy").mkdir(parents=True)
            for f in ("adapter_config.json", "adapter_model.safetensors"):
                (stand_in / "adapters" / "policy" / f).write_text("")
        if key == "lora.init_from":  # a PEFT adapter directory of the recipe's rank
            stand_in.unlink()
            stand_in.mkdir()
            (stand_in / "adapter_config.json").write_text(json.dumps({"r": raw["lora"]["r"], "peft_type": "LORA"}))
        overrides.append(f"{key}={stand_in}")
    load_config(recipe, overrides)
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


def test_config_layer_imports_no_algorithm_bundle_or_rewards():
    """The config layer sits at the bottom: parsing a recipe never imports what runs it."""
    import ast

    tree = ast.parse((REPO / "lowalign" / "config.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    banned = ("lowalign.algorithms", "lowalign.bundle", "lowalign.rewards", "lowalign.api")
    assert not [m for m in names if m.startswith(banned)], names
    code = ("import sys, dataclasses, lowalign.config as C\n"
            "@dataclasses.dataclass\nclass T:\n    steps: int = 1\n"
            "assert C.from_dict({'algorithm': 'x', 'train': {'steps': 3}}, train_configs={'x': T}).train.steps == 3\n"
            "print(sorted(m for m in sys.modules if m.startswith(('lowalign.algorithms', 'lowalign.bundle', "
            "'lowalign.rewards', 'torch'))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_algorithms_register_themselves_with_their_checks():
    from lowalign.algorithms import algorithms

    algos = algorithms()
    assert {"grpo", "ppo", "dpo", "sft", "reward_model", "essa"} <= algos.keys()
    assert algos["dpo"].data == "preferences" and algos["ppo"].data == "prompts"
    with pytest.raises(C.ConfigError, match=r"train\.num_generations: GRPO needs at least 2"):
        config_from_dict({"algorithm": "grpo"}, ["train.num_generations=1"])
    with pytest.raises(C.ConfigError, match=r"train\.population_size"):
        config_from_dict({"algorithm": "essa"}, ["train.population_size=3"])


def test_reference_init_needs_a_starting_adapter():
    with pytest.raises(C.ConfigError, match=r"reference: 'init'.*lora\.init_from"):
        config_from_dict({"algorithm": "grpo", "reference": "init"})
    cfg = config_from_dict({"algorithm": "grpo"})
    assert C.reference_mode(cfg) == "base"


def test_loftq_needs_an_nf4_base_and_a_fresh_adapter():
    with pytest.raises(C.ConfigError, match=r"lora\.init: loftq.*model\.quantization is 'none'"):
        config_from_dict({"algorithm": "grpo", "lora": {"init": "loftq"}})
    with pytest.raises(C.ConfigError, match=r"lora\.init: loftq.*lora\.init_from"):
        config_from_dict({"algorithm": "grpo", "model": {"quantization": "nf4"},
                          "lora": {"init": "loftq", "init_from": str(Path(__file__).parent)}})
    cfg = config_from_dict({"algorithm": "grpo", "model": {"quantization": "nf4"}, "lora": {"init": "loftq"}})
    assert C.reference_mode(cfg) == "init"  # the reference is the computed start, frozen
    with pytest.raises(C.ConfigError, match=r"lora\.loftq_rank: the frozen LoftQ ranks need lora\.init: loftq"):
        config_from_dict({"algorithm": "grpo", "model": {"quantization": "nf4"}, "lora": {"loftq_rank": 8}})
