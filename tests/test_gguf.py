"""GGUF as a model source: the header without converting, clear errors for bad files before anything is created,
one conversion per content, and SmolLM2-135M-Instruct (installed from its package) loaded through lowalign with
log-probs equal to transformers' own reading of the same file."""

import shutil

import pytest
import torch

from lowalign import gguf_source
from lowalign.config import ConfigError

from .algorithms.helpers import cli

SMOL = "package:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_file():
    return gguf_source.packaged_gguf(SMOL)  # installed by `scripts/install.sh --real` (what CI runs)


def test_header_of_the_packaged_smollm2(smol_file):
    h = gguf_source.read_header(smol_file)
    assert (h.architecture, h.get("block_count"), h.get("embedding_length"), h.vocab_size) == ("llama", 30, 576, 49152)
    assert h.metadata["tokenizer.ggml.eos_token_id"] == 2 and "tokenizer.ggml.tokens" not in h.metadata
    gguf_source.check_architecture(h)


def test_validate_reads_the_header_and_resolves_lora_targets():
    p = cli("validate", "recipes/grpo_smollm2.yaml")
    assert "LoRA on ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in p.stdout


def _write_gguf(path, arch: str):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", ["text", "truncated_data", "truncated_header", "architecture", "missing"])
def test_bad_gguf_is_a_config_error_naming_the_file_and_creates_nothing(tmp_path, smol_file, kind):
    f = tmp_path / "model.gguf"
    if kind == "text":
        f.write_text("this is not a model\n")
        want = "is not a GGUF file"
    elif kind in ("truncated_data", "truncated_header"):
        with open(smol_file, "rb") as src:
            f.write_bytes(src.read(20 << 20 if kind == "truncated_data" else 4096))
        want = "is truncated"
    elif kind == "architecture":
        _write_gguf(f, "rwkv6")
        want = "'rwkv6' GGUF, which transformers cannot read"
    else:
        want = "GGUF file not found"
    with pytest.raises(ConfigError, match=want) as e:
        gguf_source.convert(f)
    assert str(f) in str(e.value) or kind == "missing"
    out = tmp_path / "run"
    p = cli("run", "recipes/grpo_tiny.yaml", f"model.name_or_path={f}", f"output_dir={out}", check=False)
    assert p.returncode != 0 and want in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


def test_gguf_file_inside_a_directory_and_its_errors(tmp_path, smol_file):
    from lowalign.models import gguf_path

    d = tmp_path / "models"
    d.mkdir()
    (d / "smol.gguf").symlink_to(smol_file)
    assert gguf_path(str(d), "smol.gguf") == d / "smol.gguf"
    with pytest.raises(ConfigError, match=r"gguf_file: .*other.gguf not found \(the directory has \['smol.gguf'\]"):
        gguf_path(str(d), "other.gguf")
    with pytest.raises(ConfigError, match="unknown packaged model 'package:smollm2'. Did you mean"):
        gguf_path("package:smollm2")


def test_smollm2_through_lowalign_equals_transformers_and_converts_once(smol_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lowalign.bundle import ModelBundle
    from lowalign.config import ModelConfig
    from lowalign.generation import encode_completions
    from lowalign.logprobs import token_logprobs
    from lowalign.models import resolve_path

    d = resolve_path(SMOL)  # converts unless an earlier test (or run) of this checkout did
    assert (gguf_source.cached_dir(smol_file) / gguf_source.MARKER).exists()
    b = ModelBundle.load(ModelConfig(name_or_path=SMOL))
    assert b.tokenizer.eos_token == "<|im_end|>" and b.tokenizer.chat_template
    prompts = [b.tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                               add_generation_prompt=True)
               for q in ("What is 13 + 54? Reply with just the number.", "Name a colour.")]
    batch = encode_completions(b.tokenizer, prompts, ["13 + 54 = 67", "Blue is a colour."], b.device)
    with torch.no_grad():
        got = token_logprobs(b, batch.input_ids, batch.attention_mask, batch.target_mask).logps
        ref_model = AutoModelForCausalLM.from_pretrained(str(smol_file.parent), gguf_file=smol_file.name,
                                                         dtype=torch.float32)
        pos = (batch.attention_mask.cumsum(-1) - 1).masked_fill(batch.attention_mask == 0, 1)
        logits = ref_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    m = batch.target_mask[:, 1:].bool()
    torch.testing.assert_close(got[:, 1:][m], want[m], rtol=0, atol=1e-4)

    def no_second_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_source, "_convert_into", no_second_conversion)
    assert resolve_path(SMOL) == d  # the cache, by content: a copy under another name too
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(smol_file, copy)
    assert resolve_path(str(copy)) == d


def test_two_processes_converting_at_once_convert_once(smol_file, tmp_path, monkeypatch):
    """A second process (here a thread: flock locks per open file) that asks for a conversion in progress waits
    for it and loads its result; nobody converts twice."""
    import threading
    import time

    monkeypatch.setenv("LOWALIGN_CACHE", str(tmp_path / "cache"))  # nothing converted yet
    calls = []

    def slow_convert(h, out, console):
        calls.append(out)
        time.sleep(1.0)
        out.mkdir(parents=True)

    monkeypatch.setattr(gguf_source, "_convert_into", slow_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(gguf_source.convert(smol_file))) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert len(calls) == 1 and got[0] == got[1] == gguf_source.cached_dir(smol_file)
    assert gguf_source.is_converted(got[0])
