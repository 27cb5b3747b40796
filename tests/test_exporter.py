"""`lowalign export`: a run's adapter merged into its base, as a transformers directory or a GGUF file, checked
against the adapter model itself (plain transformers + peft, or the nf4 bundle the run trained): logits within
1e-4 in f32, equal greedy completions of held-out prompts; GGUF files read back with transformers' GGUF reader
for every architecture the writer maps; every bad input refused before anything is written."""

import json

import pytest
import torch

from lowalign import exporter as E

from .algorithms.helpers import cli
from .test_architectures import arch_dirs

IDS = torch.tensor([[5, 61, 35, 55, 58, 46, 54, 59, 64, 35, 68, 61], [7, 61, 35, 52, 46, 53, 64, 35, 68, 61, 55, 52]])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two GRPO steps on builtin:tiny (a real run directory, from the CLI), with its adapter pushed away from
    zero so that merging it visibly changes the model."""
    from safetensors.torch import load_file, save_file

    run = tmp_path_factory.mktemp("export") / "run"
    cli("run", "grpo_tiny", "train.steps=2", "train.prompts_per_step=4", "eval.num_examples=20",
        f"output_dir={run}")
    f = run / "adapters" / "policy" / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if "lora_B" in k else v
             for k, v in load_file(str(f)).items()}
    save_file(state, str(f))
    return run


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    """The tiny random-weight architectures of test_architectures."""
    return arch_dirs(tmp_path_factory)


def _adapter_model(run):
    """The reference: the base and the run's saved adapter in plain transformers + peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowalign.tiny import resolve_builtin

    base = AutoModelForCausalLM.from_pretrained(str(resolve_builtin("builtin:tiny")), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run / "adapters" / "policy")).eval()


def _held_out_prompts(n=20):
    from lowalign.config import DataConfig
    from lowalign.data import load_prompt_data

    return [r["prompt"] for r in load_prompt_data(DataConfig(), 0, n).eval_rows_all[:n]]


def _greedy(model, tok, prompts, new=6):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc.input_ids.shape[1]:].tolist()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_directory_loads_in_plain_transformers_and_equals_the_adapter_model(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    cli("export", tiny_run, "--out", out)
    assert {"config.json", "model.safetensors", "tokenizer_config.json", E.MARKER} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = _adapter_model(tiny_run)
    with torch.no_grad(), ref.disable_adapter():
        base = _logits(ref)
    want = _logits(ref)
    assert (want - base).abs().max() > 1e-2  # the adapter matters: a merge that dropped it would fail below
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(out))
    prompts = _held_out_prompts()
    assert _greedy(merged, tok, prompts) == _greedy(ref, tok, prompts)
    prov = json.loads((out / E.MARKER).read_text())
    assert prov["role"] == "policy" and prov["base"] == "builtin:tiny" and prov["type"] == "f32"


def test_gguf_of_a_llama_run_reads_back_in_transformers(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    cli("export", tiny_run, "--out", merged)
    m = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    tok = AutoTokenizer.from_pretrained(str(merged))
    for kind in ("f32", "f16", "q8_0"):
        flag = ["--quant", kind] if kind.startswith("q") else ["--dtype", kind]
        p = cli("export", tiny_run, "--out", tmp_path / f"{kind}.gguf", "--format", "gguf", *flag)
        assert "wrote" in p.stderr
        g = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"{kind}.gguf", dtype=torch.float32)
        diff = (_logits(g.eval()) - _logits(m)).abs().max().item()
        if kind == "f32":
            assert diff < 1e-4
        else:
            assert diff < (0.05 if kind == "f16" else 0.5)  # rounded weights: close, not equal
        if kind == "f16":
            prompts = _held_out_prompts()
            assert _greedy(g, tok, prompts) == _greedy(m, tok, prompts)
    import gguf

    r = gguf.GGUFReader(str(tmp_path / "q8_0.gguf"))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    prov = json.loads(r.fields["lowalign.export"].contents())
    assert prov["type"] == "q8_0" and prov["format"] == "gguf"


def _fake_run(root, model_dir, quantization="none", init="default", head=False, noise=0.05, gptq_rows=0):
    """A run directory holding config.yaml and a saved adapter with random B (no training needed); with
    ``gptq_rows``, the nf4 base calibrated as a run calibrates it."""
    import yaml

    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig

    role = "reward" if head else "policy"
    root.mkdir(parents=True)
    raw = {"algorithm": "reward_model" if head else "grpo",
           "model": {"name_or_path": str(model_dir), "quantization": quantization, "gptq_rows": gptq_rows},
           "lora": {"r": 4, "alpha": 8, "init": init}}
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    b = ModelBundle.load(ModelConfig(name_or_path=str(model_dir), dtype="float32", quantization=quantization))
    if gptq_rows:
        from lowalign import api
        from lowalign.data import prepare_prompts

        cfg = api.config_from_dict(raw)
        data = api.load_data(cfg, b.tokenizer)
        prepare_prompts(data, b.tokenizer, cfg.data)
        b.calibrate_nf4(api.calibration_texts(cfg, data))
    torch.manual_seed(1)  # A's init and B's noise: the same adapter every run
    b.add_adapter(role, LoraConfig(r=4, alpha=8, init=init))
    for _, _, B, _ in b.lora_factors(role):
        B.data.add_(torch.randn_like(B) * noise)
    if head:
        b.add_head(role)
        torch.nn.init.normal_(b.heads[role].weight, std=0.5)
        b.save_heads(root / "adapters" / "heads.safetensors")
        (root / "adapters" / "reward_meta.json").write_text(json.dumps({"adapter": role}))
    b.save_adapter(role, root / "adapters" / role)
    return b


def _qwen3_with_its_real_head_dim(tmp_path):
    """Qwen3 with head_dim 128, as every Qwen3 has: transformers' reader takes Qwen3's head_dim from its
    default (the skeleton's head_dim 8 cannot travel in a GGUF; that refusal is tested below)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from lowalign.tiny import byte_tokenizer

    from .test_architectures import COMMON

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(transformers.Qwen3Config(**{**COMMON, "head_dim": 128}))
    d = tmp_path / "qwen3"
    m.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "qwen3", "gemma3"])
def test_gguf_round_trip_on_each_architecture_it_maps(name, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    b = _fake_run(tmp_path / "run", _qwen3_with_its_real_head_dim(tmp_path) if name == "qwen3" else arch(name))
    with torch.no_grad(), b.use("policy"):
        want = _logits(b.base)
    E.export(tmp_path / "run", tmp_path / "m.gguf", format="gguf", dtype="f32")
    g = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(g), want, rtol=0, atol=1e-4)


def test_a_setting_gguf_cannot_carry_is_refused_before_loading(arch, tmp_path):
    _fake_run(tmp_path / "run", arch("qwen3"))  # head_dim 8: transformers would read 128 back
    with pytest.raises(E.ExportError, match=r"head_dim=8 \(reads back as 128\)"):
        E.plan_export(tmp_path / "run", tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("name", ["gpt2", "phi3"])
def test_gguf_of_an_architecture_it_cannot_map_is_refused_naming_it(name, arch, tmp_path):
    _fake_run(tmp_path / "run", arch(name))
    with pytest.raises(E.ExportError, match=f"cannot map architecture '{name}'.*llama"):
        E.plan_export(tmp_path / "run", tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists()
    E.export(tmp_path / "run", tmp_path / "merged")  # merged works for any architecture
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("init,gptq_rows", [("default", 0), ("loftq", 0), ("loftq", 16)])
def test_an_nf4_run_exports_the_model_it_trained(init, gptq_rows, tmp_path, monkeypatch):
    """Merged into the dequantized nf4 weights in full precision: the export computes what the nf4 bundle
    computed (a LoftQ adapter holds the quantization error's correction, so merging it into the original
    weights would count that correction twice; GPTQ-calibrated weights are calibrated again, or read from the
    cache, the same way)."""
    from transformers import AutoModelForCausalLM

    from lowalign.tiny import resolve_builtin

    monkeypatch.setenv("LOWALIGN_CACHE", str(tmp_path / "cache"))
    b = _fake_run(tmp_path / "run", resolve_builtin("builtin:tiny"), quantization="nf4", init=init, noise=0.02,
                  gptq_rows=gptq_rows)
    with torch.no_grad(), b.use("policy"):
        want = _logits(b.base)
    if gptq_rows:  # the export must not fall back to plain rounding: it would compute something else
        import shutil

        rtn = _fake_run(tmp_path / "rtn", resolve_builtin("builtin:tiny"), quantization="nf4", init=init, noise=0.02)
        with torch.no_grad(), rtn.use("policy"):
            assert (_logits(rtn.base) - want).abs().max() > 1e-2
        shutil.rmtree(tmp_path / "cache" / "nf4-gptq")  # and without the cache it calibrates again, the same
    E.export(tmp_path / "run", tmp_path / "merged")
    got = _logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    notes = json.loads((tmp_path / "merged" / E.MARKER).read_text())["notes"][0]
    assert "nf4" in notes and ("GPTQ" in notes) == bool(gptq_rows)


def test_a_reward_adapter_exports_merged_with_its_head(arch, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    b = _fake_run(tmp_path / "run", arch("llama"), head=True)
    mask = torch.ones_like(IDS)
    with torch.no_grad(), b.use("reward"):
        want = b.score("reward", IDS, mask)[:, 0]
    with pytest.raises(E.ExportError, match="--format merged"):
        E.plan_export(tmp_path / "run", tmp_path / "r.gguf", format="gguf", role="reward")
    with pytest.raises(E.ExportError, match="no policy adapter.*'reward'"):
        E.plan_export(tmp_path / "run", tmp_path / "out")
    out = E.export(tmp_path / "run", tmp_path / "out", role="reward")
    head = load_file(str(out / "heads.safetensors"))["reward.weight"]
    m = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        h = m(input_ids=IDS, output_hidden_states=True).hidden_states[-1][:, -1]
    torch.testing.assert_close(h @ head[0], want, rtol=0, atol=1e-4)
    assert (out / "reward_meta.json").is_file()


def test_bad_inputs_are_refused_before_anything_is_written(tiny_run, tmp_path, monkeypatch):
    def refused(match, *a, **kw):
        with pytest.raises(E.ExportError, match=match):
            E.plan_export(*a, **kw)

    out = tmp_path / "out"
    refused("not a directory", tmp_path / "nope", out)
    refused("not a lowalign run directory", tmp_path, out)
    refused("--format", tiny_run, out, format="onnx")
    refused("--quant: 'q4_k'", tiny_run, tmp_path / "m.gguf", format="gguf", quant="q4_k")
    refused("--quant: quantized types are for --format gguf", tiny_run, out, quant="q8_0")
    refused("--dtype and --quant", tiny_run, tmp_path / "m.gguf", format="gguf", quant="q8_0", dtype="f16")
    refused("ending in .gguf", tiny_run, tmp_path / "m.bin", format="gguf")
    # a run that has not finished: no adapters/policy yet, its checkpoints named
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "step_000002").mkdir(parents=True)
    (unfinished / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    (unfinished / "checkpoints" / "latest").write_text("step_000002")
    refused("has no policy adapter.*checkpoints/step_000002", unfinished, out)
    # an existing output: refused without overwrite; with it, only an earlier export is replaced
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    refused("exists; choose another path or pass --overwrite", tiny_run, theirs)
    refused("not a model", tiny_run, theirs, overwrite=True)
    assert (theirs / "notes.txt").read_text() == "mine"
    import lowalign

    assert lowalign.export(tiny_run, out) == out  # the Python API
    E.export(tiny_run, out, overwrite=True, dtype="bf16")
    assert json.loads((out / E.MARKER).read_text())["type"] == "bf16"
    # too little disk, from the estimated size
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    refused("MiB free; the export needs about", tiny_run, tmp_path / "big")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "theirs", "unfinished"]


def test_cli_reports_a_bad_export_in_one_line(tiny_run, tmp_path):
    p = cli("export", tiny_run, "--out", tmp_path / "x.gguf", "--format", "gguf", "--quant", "q3", check=False)
    assert p.returncode == 2 and "error: --quant: 'q3'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_a_bpe_tokenizer_is_written_into_the_gguf_and_reads_back(arch, tmp_path):
    """A model that did not come from a GGUF: its BPE tokenizer.json becomes the GGUF's token list and merges
    (with the chat template), and transformers' GGUF reader rebuilds a tokenizer that encodes alike."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = tmp_path / "model"
    import shutil

    shutil.copytree(arch("llama"), d)
    for f in d.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["What is 13 + 54? The answer is 67.", "Reply with just the number.", "hello world"] * 20
    t.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    tok.save_pretrained(str(d))
    _fake_run(tmp_path / "run", d)
    E.export(tmp_path / "run", tmp_path / "m.gguf", format="gguf")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for s in ["What is 13 + 54?", "The answer is 67.", "hello"]:
        assert back.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)
    assert back.chat_template == tok.chat_template and back.eos_token == "</s>"
    # and lowalign takes the exported file as a base (converted once, then one GRPO step)
    run2 = tmp_path / "run2"
    cli("run", "grpo_tiny", f"model.name_or_path={tmp_path / 'm.gguf'}", "train.steps=1", "train.prompts_per_step=2",
        "eval.num_examples=4", f"output_dir={run2}")
    assert (run2 / "adapters" / "policy" / "adapter_model.safetensors").is_file()
