"""ORPO, SimPO, KTO and TDPO end to end on the tiny model: short recipe runs, no reference pass for the
reference-free losses, KTO's data paths, and the model-level exact KL against full logits."""

import json

import pytest
import torch

from .helpers import cli, metrics, roles_used, summary

SMALL = ["data.num_pairs=64", "train.eval_pairs=32", "eval.num_examples=40", "train.batch_size=8",
         "train.checkpoint_every=0", "threads=1"]


@pytest.mark.parametrize("algo,metric", [("orpo", "preference_accuracy"), ("simpo", "preference_accuracy"),
                                         ("tdpo", "preference_accuracy"), ("kto", "label_accuracy")])
def test_tiny_recipe_runs(tmp_path, algo, metric):
    out = tmp_path / algo
    cli("run", f"recipes/{algo}_tiny.yaml", f"output_dir={out}", "train.steps=4", *SMALL)
    s = summary(out)
    assert {"accuracy", metric} <= s["final"].keys() and 0 <= s["final"][metric] <= 1
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in rows)  # no NaN
    if algo == "kto":
        assert s["rows"] >= 64 and s["baseline"]["label_accuracy"] == 0.5  # fresh adapter = reference
        fb = json.loads((out / "feedback.json").read_text())
        assert {r["label"] for r in fb["train"]} == {True, False}
        assert all(r["kl"] >= 0 for r in rows)
    if algo == "tdpo":
        assert rows[0]["kl/chosen"] == pytest.approx(0, abs=1e-6)  # step 1: policy == reference
        assert rows[-1]["kl/chosen"] > 0 and rows[-1]["kl/rejected"] > 0
        assert s["baseline"]["preference_accuracy"] == 0.5
    if algo == "orpo":
        assert rows[0]["nll/chosen"] > rows[-1]["nll/chosen"]  # it fine-tunes on the chosen completions


@pytest.mark.parametrize("algo", ["orpo", "simpo"])
def test_reference_free_losses_never_run_the_reference(tmp_path, monkeypatch, algo):
    roles = roles_used(monkeypatch, f"recipes/{algo}_tiny.yaml", [f"output_dir={tmp_path / algo}", "train.steps=2",
                                                                   *SMALL])
    assert "policy" in roles and "reference" not in roles
    roles = roles_used(monkeypatch, "recipes/dpo_tiny.yaml", [f"output_dir={tmp_path / 'dpo'}", "train.steps=1",
                                                              *SMALL])
    assert "reference" in roles  # the same probe sees DPO's reference passes


def test_kto_on_a_feedback_file_and_on_pairs_split(tmp_path):
    rows = [{"prompt": f"Q: {i}+{i}= A:", "completion": str(2 * i) if i % 3 else str(2 * i + 1),
             "label": bool(i % 3)} for i in range(60)]
    f = tmp_path / "fb.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "kto_file"
    cli("run", "recipes/kto_tiny.yaml", f"output_dir={out}", f"data.path={f}", "train.steps=2", *SMALL)
    fb = json.loads((out / "feedback.json").read_text())
    assert len(fb["train"]) + len(fb["eval"]) == 60 and summary(out)["rows"] == len(fb["train"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q: {i}+1= A:", "chosen": str(i + 1), "rejected": str(i)}) + "\n"
                             for i in range(40)))
    out2 = tmp_path / "kto_pairs"
    cli("run", "recipes/kto_tiny.yaml", f"output_dir={out2}", f"data.path={pairs}", "data.pairs_as_feedback=true",
        "train.steps=2", *SMALL)
    fb2 = json.loads((out2 / "feedback.json").read_text())
    assert len(fb2["train"]) == 72 and sum(r["label"] for r in fb2["train"]) == 36  # 36 train pairs, split


def test_kto_bad_feedback_fails_before_loading_the_model(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "p", "completion": "a", "label": "yes"}) + "\n")
    p = cli("run", "recipes/kto_tiny.yaml", f"output_dir={tmp_path / 'x'}", f"data.path={f}", check=False)
    assert p.returncode == 2 and "column 'label' must be true or false" in p.stderr and "row 1" in p.stderr
    assert not (tmp_path / "x").exists()
    f.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    p = cli("run", "recipes/kto_tiny.yaml", f"output_dir={tmp_path / 'x'}", f"data.path={f}", check=False)
    assert p.returncode == 2 and "data.pairs_as_feedback=true" in p.stderr
    p = cli("validate", "recipes/dpo_tiny.yaml", "data.pairs_as_feedback=true", check=False)
    assert p.returncode == 2 and "data.pairs_as_feedback: 'dpo' reads preferences" in p.stderr


def test_exact_kl_from_the_bundle_equals_kl_div_on_full_logits():
    """Model level: the fused KL between the policy adapter and the reference (adapters off) equals
    kl_div on the two roles' full logits, and its gradient reaches the policy adapter."""
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.generation import encode_completions
    from lowalign.logprobs import kl_from_hidden

    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig())
    torch.manual_seed(0)
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, 0.05)
    enc = encode_completions(b.tokenizer, ["Q: 12+30= A:", "Q: 7+8= A:"], ["42", "15 "], b.device)
    with torch.no_grad(), b.use("reference"):
        ref_h = b.hidden_states(enc.input_ids, enc.attention_mask)
        ref_head = b.lm_head()
        ref_logits = b.base(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    with b.use("policy"):
        h = b.hidden_states(enc.input_ids, enc.attention_mask)
        tk = kl_from_hidden(b, h, ref_h, ref_head, enc.input_ids, enc.target_mask)
        logits = b.base(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    want = torch.nn.functional.kl_div(logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1),
                                      reduction="none", log_target=True).sum(-1)  # (B, T) at the predicting position
    m = enc.target_mask[:, 1:].bool()
    torch.testing.assert_close(tk.kl[:, 1:][m], want[:, :-1][m], rtol=1e-4, atol=1e-5)
    assert (tk.kl[:, 1:][m] > 0).all() and tk.kl[:, 1:][m].mean() > 1e-3 and (tk.kl[:, 1:][~m] == 0).all()
    tk.kl.sum().backward()
    assert any(B.grad is not None and B.grad.abs().sum() > 0 for _, _, B, _ in b.lora_factors("policy"))


def test_tdpo_sequence_kl_with_the_shared_prompt_equals_whole_rows():
    """TDPO's log-ratios and sequential KLs run a pair's prompt once (lowalign.prompt_sharing, the packed
    forward when training): the same values, and the same LoRA gradients, as the whole rows."""
    from lowalign.algorithms.pairs import encode_pairs
    from lowalign.algorithms.tdpo import sequence_kl
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.logprobs import kl_from_hidden

    b = ModelBundle.load(ModelConfig(name_or_path="builtin:tiny", dtype="float32"))
    torch.manual_seed(0)
    b.add_adapter("policy", LoraConfig(r=4, alpha=8))
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, 0.1)
    long = "Add the two numbers and reply with the sum only: 12 + 7 = "
    pairs = [{"prompt": long, "chosen": "19", "rejected": "18"}, {"prompt": "3+4=", "chosen": "7", "rejected": "8"}]

    def whole():
        e = encode_pairs(b, pairs)
        with torch.no_grad(), b.use("reference"):
            ref_hidden, ref_head = b.hidden_states(e.input_ids, e.attention_mask), b.lm_head()
        tk = kl_from_hidden(b, b.hidden_states(e.input_ids, e.attention_mask), ref_hidden, ref_head, e.input_ids,
                            e.target_mask)
        m = e.target_mask.float()
        return ((tk.logps - tk.ref_logps) * m).sum(1), (tk.kl * m).sum(1)

    from lowalign.prompt_sharing import packing_pays, prompt_groups

    e = encode_pairs(b, pairs)
    order, g = prompt_groups(e.prompt_ids, e.prompt_mask)
    assert g == 2 and order is not None  # chosen rows, then rejected rows: regrouped
    assert packing_pays(b.base.config, *e.prompt_ids.shape, e.completion_ids.shape[1], g)  # the packed path runs
    params = b.adapter_parameters("policy")
    out, grads = [], []
    with b.use("policy"):
        for fn in (whole, lambda: sequence_kl(b, pairs)):
            ratio, kl = fn()
            (ratio.sum() + kl.sum()).backward()
            out.append((ratio.detach(), kl.detach()))
            grads.append([p.grad.clone() for p in params])
            b.base.zero_grad(set_to_none=True)
    assert bool((out[0][1] > 0).all())
    for want, got in zip(*out):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
