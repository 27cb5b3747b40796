"""The real pretrained models that install as packages, in their CI-sized form: Gemma-3-270M loads from its four
chunk packages, its fused log-probs equal transformers' forward on the converted weights, and one GRPO and one
DPO step run with policy == reference at step 1; SmolLM2-135M-Instruct runs its recipe for one short step with
accuracy equal to the correctness reward's held-out mean (one checker). The full runs are benchmark commands
(benchmarks/RESULTS.md, "Real models")."""

import pytest
import torch

from lowalign import gguf_source

from .algorithms.helpers import STEP, cli, one_grpo_and_one_dpo_step, summary

GEMMA = "package:gemma3-270m"


@pytest.mark.slow
def test_gemma3_fused_logprobs_equal_transformers_on_its_real_weights():
    from transformers import AutoModelForCausalLM

    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.generation import encode_completions
    from lowalign.logprobs import token_logprobs

    f = gguf_source.packaged_gguf(GEMMA)  # assembled from the part packages (sha256 checked) on first use
    assert gguf_source.read_header(f).architecture == "gemma3"
    b = ModelBundle.load(ModelConfig(name_or_path=GEMMA))
    b.add_adapter("policy", LoraConfig(r=4))
    batch = encode_completions(b.tokenizer, ["The capital of France is", "Q: 13+54= A:"], [" Paris.", " 67"],
                               b.device)
    with torch.no_grad():
        with b.use("policy"):  # a fresh LoRA (B = 0) computes the base
            got = token_logprobs(b, batch.input_ids, batch.attention_mask, batch.target_mask).logps
        # transformers' own forward on the weights its GGUF reader gave (the conversion lowalign cached: re-reading
        # the 262k-vocabulary GGUF costs a minute of CI; test_gguf.py checks conversion == reader on SmolLM2)
        ref = AutoModelForCausalLM.from_pretrained(str(gguf_source.convert(f)), dtype=torch.float32)
        pos = (batch.attention_mask.cumsum(-1) - 1).masked_fill(batch.attention_mask == 0, 1)
        logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    m = batch.target_mask[:, 1:].bool()
    torch.testing.assert_close(got[:, 1:][m], want[m], rtol=0, atol=1e-4)
    assert want[0][m[0]].sum() > want[1][m[1]].sum() - 20  # real weights: " Paris." is not noise


@pytest.mark.slow
def test_gemma3_one_grpo_and_one_dpo_step(tmp_path):
    one_grpo_and_one_dpo_step(GEMMA, tmp_path)


@pytest.mark.slow
def test_grpo_smollm2_short_form(tmp_path):
    """The recipe as shipped, one small step: chat prompts, the auto micro-batch, accuracy == correctness."""
    out = tmp_path / "run"
    p = cli("run", "recipes/grpo_smollm2.yaml", f"output_dir={out}", "train.prompts_per_step=2",
            "train.num_generations=4", "eval.num_examples=8", *STEP)
    assert "memory: micro_batch_size" in p.stderr and "planned peak" in p.stderr
    s = summary(out)
    for k in ("baseline", "final"):
        assert s[k]["accuracy"] == s[k]["reward/correctness_reward"]
    assert s["final_samples"][0]["prompt"].startswith("What is ")  # the question, not the chat template


@pytest.mark.slow
def test_dpo_smollm2_short_form(tmp_path):
    """The DPO recipe on the real model, one small step: its built-in pairs (own samples ranked by the run's
    checker, and near misses) are chat prompts like its training and held-out prompts."""
    import json

    out = tmp_path / "run"
    cli("run", "recipes/dpo_smollm2.yaml", f"output_dir={out}", "data.num_pairs=8", "train.onpolicy_samples=2",
        "train.eval_pairs=4", "train.batch_size=4", "eval.num_examples=4", "train.steps=1", "threads=2")
    pairs = json.loads((out / "pairs.json").read_text())
    for p in pairs["train"] + pairs["eval"]:
        assert p["prompt"].startswith("<|im_start|>") and "What is " in p["prompt"], p["prompt"]
        assert p["prompt"].endswith("<|im_start|>assistant\n")
    s = summary(out)
    assert s["final"]["accuracy"] == s["final"]["reward/correctness_reward"]


@pytest.mark.slow
def test_smollm2_exports_to_a_gguf_with_its_tokenizer_and_chat_template(tmp_path):
    """The real model's export: the GGUF default is the source's type (Q4_1); a q8_0 file carries the source's
    tokenizer and chat template (transformers rebuilds the same tokenizer from it) and computes what the
    adapter model computes, up to q8_0 rounding."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowalign import exporter as E

    from .test_exporter import _fake_run

    b = _fake_run(tmp_path / "run", "package:smollm2-135m-instruct", noise=0.01)
    assert E.plan_export(tmp_path / "run", tmp_path / "d.gguf", format="gguf").type == "q4_1"
    out = E.export(tmp_path / "run", tmp_path / "m.gguf", format="gguf", quant="q8_0")
    src = gguf.GGUFReader(str(gguf_source.packaged_gguf("package:smollm2-135m-instruct")))
    mine = gguf.GGUFReader(str(out))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "tokenizer.ggml.eos_token_id"):
        assert mine.fields[key].contents() == src.fields[key].contents(), key
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert tok.chat_template == b.tokenizer.chat_template
    chat = b.tokenizer.apply_chat_template([{"role": "user", "content": "What is 13 + 54?"}], tokenize=False,
                                           add_generation_prompt=True) + "13 + 54 = 67"
    ids = b.tokenizer(chat, return_tensors="pt").input_ids
    assert tok(chat, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad(), b.use("policy"):
        want = b.base(input_ids=ids).logits.float()
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                   dtype=torch.float32)(input_ids=ids).logits.float()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    want, got = want.log_softmax(-1), got.log_softmax(-1)
    # KL(adapter model || GGUF) at each position: 0.008-0.020 over four adapter inits. The largest gap on any
    # single vocabulary entry is a far-tail token's (0.86-1.81 over the same inits), too noisy to bound.
    assert (want.exp() * (want - got)).sum(-1).max() < 0.06
    top = want.topk(10, -1).indices  # the tokens a sampler can pick keep their log-probs to q8_0 rounding
    assert (got - want).abs().gather(-1, top).max() < 1.0  # measured 0.50-0.75
