import pytest
import torch

from lowalign.bundle import ModelBundle, guard_avx512bf16
from lowalign.config import ConfigError, LoraConfig, ModelConfig
from lowalign.logprobs import token_logprobs
from lowalign.tiny import TINY_DIR

IDS = torch.tensor([[84, 61, 35, 55, 58, 46, 54, 59, 64, 35, 68, 61], [84, 61, 35, 52, 46, 53, 64, 35, 68, 61, 55, 52]])
MASK = torch.ones_like(IDS)


def _bundle(name="builtin:tiny", **kw):
    b = ModelBundle.load(ModelConfig(name_or_path=name, **kw))
    b.add_adapter("policy", LoraConfig(r=4, alpha=8))
    return b


def _train_step(b, lr=1e-2):
    opt = torch.optim.SGD(b.adapter_parameters("policy"), lr=lr)
    with b.use("policy"):
        loss = b.causal_lm(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def _logits(b, role):
    with b.use(role), torch.no_grad():
        return b.causal_lm(input_ids=IDS, attention_mask=MASK).logits


def test_roles_share_one_base():
    from transformers import AutoModelForCausalLM

    b = _bundle()
    _train_step(b)
    plain = AutoModelForCausalLM.from_pretrained(TINY_DIR).eval()
    with torch.no_grad():
        base_logits = plain(input_ids=IDS, attention_mask=MASK).logits
    ref = _logits(b, "reference")
    pol = _logits(b, "policy")
    torch.testing.assert_close(ref, base_logits, rtol=0, atol=1e-5)
    assert (pol - ref).abs().max() > 1e-3  # the trained adapter changes the policy

    def base_ptrs():
        return sorted(p.data_ptr() for n, p in b.base.named_parameters() if "lora_" not in n)

    with b.use("reference"):
        ptr_ref = base_ptrs()
    with b.use("policy"):
        ptr_pol = base_ptrs()
    assert ptr_ref == ptr_pol and len(set(ptr_ref)) == len(ptr_ref)  # one copy, no duplicates
    uniq = {t.data_ptr(): t for t in [*plain.parameters(), *plain.buffers()]}.values()
    n_plain = sum(t.numel() * t.element_size() for t in uniq)
    assert b.memory_report()["base"] == n_plain  # base bytes = exactly one model's weights
    assert b.role == "policy"


def test_use_restores_role_and_rejects_unknown():
    b = _bundle()
    b.add_adapter("reward", LoraConfig(r=2))
    with b.use("policy"):
        with b.use("reward"):
            assert b.role == "reward"
        assert b.role == "policy"
        assert all(p.requires_grad for p in b.adapter_parameters("policy"))
    with pytest.raises(KeyError, match="unknown role 'critic'"):
        with b.use("critic"):
            pass


def test_peft_roundtrip_with_plain_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    b = _bundle()
    _train_step(b)
    b.save_adapter("policy", tmp_path / "policy")
    assert (tmp_path / "policy" / "adapter_config.json").exists()
    assert (tmp_path / "policy" / "adapter_model.safetensors").exists()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_DIR), tmp_path / "policy").eval()
    with torch.no_grad():
        got = plain(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, _logits(b, "policy"), rtol=0, atol=1e-5)
    # and our loader reads it back into a fresh bundle
    b2 = _bundle()
    b2.load_adapter("policy", tmp_path / "policy")
    torch.testing.assert_close(_logits(b2, "policy"), _logits(b, "policy"), rtol=0, atol=1e-6)


def test_heads_and_memory_report(tmp_path):
    b = _bundle()
    b.add_head("reward", 3)
    with b.use("policy"):
        s = b.score("reward", IDS, MASK)
    assert s.shape == (2, 3)
    b.save_heads(tmp_path / "heads.safetensors")
    b2 = _bundle()
    b2.load_heads(tmp_path / "heads.safetensors")
    torch.testing.assert_close(b2.heads["reward"].weight, b.heads["reward"].weight)
    opt = torch.optim.AdamW(b.adapter_parameters("policy"))
    _train_step(b)
    with b.use("policy"):
        b.causal_lm(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    rep = b.memory_report(opt)
    lora = sum(p.numel() * 4 for p in b.adapter_parameters("policy"))
    assert rep["adapter:policy"] == lora and rep["optimizer"] >= 2 * lora and rep["head:reward"] == (256 * 3 + 3) * 4


def _lora_grads(b):
    with b.use("policy"):
        loss = b.causal_lm(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
    loss.backward()
    g = {n: p.grad.clone() for n, p in b.base.named_parameters() if "lora_B" in n}
    b.base.zero_grad()
    return g


def test_nf4_lora_gradients_survive_eval_forward():
    torch.manual_seed(0)
    fresh = _bundle(quantization="nf4")
    torch.manual_seed(0)
    b = _bundle(quantization="nf4")
    import bitsandbytes as bnb

    layers = [m for m in b.base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    b.base.eval()
    with torch.no_grad(), b.use("policy"):
        b.causal_lm(input_ids=IDS, attention_mask=MASK)  # the forward that used to repack weights
    b.base.train()
    g, g_ref = _lora_grads(b), _lora_grads(fresh)
    assert g and all(v.abs().sum() > 0 for v in g.values())
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k])


def test_guard_sets_flag_on_every_linear4bit():
    class Fake(torch.nn.Module):
        support_avx512bf16_for_cpu = True

    m = torch.nn.Sequential(Fake(), torch.nn.Linear(2, 2), Fake())
    assert guard_avx512bf16(m) == 2 and not any(getattr(x, "support_avx512bf16_for_cpu", False) for x in m)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_real_model_families_load_and_logprobs_match(fixture, quant, request):
    d = request.getfixturevalue(fixture)
    b = _bundle(str(d), quantization=quant)
    tmask = torch.zeros_like(IDS)
    tmask[:, 5:] = 1
    with b.use("policy"):
        out = token_logprobs(b, IDS, MASK, tmask)
        logits = b.causal_lm(input_ids=IDS, attention_mask=MASK).logits.float()
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, IDS[:, 1:, None]).squeeze(-1) * tmask[:, 1:]
    torch.testing.assert_close(out.logps[:, 1:], want, rtol=1e-4, atol=1e-4)
    assert (out.logps[:, :5] == 0).all()


def test_int8_loads_and_runs():
    b = _bundle(quantization="int8")
    logits = _logits(b, "policy")
    assert torch.isfinite(logits).all()


def test_unsloth_needs_gpu():
    if torch.cuda.is_available():
        pytest.skip("this check is about CPU-only machines")
    with pytest.raises(ConfigError, match="unsloth.*CUDA GPU"):
        ModelBundle.load(ModelConfig(backend="unsloth"))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        b = _bundle(gradient_checkpointing=gc)
        with torch.no_grad():
            for n, p in b.base.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        b.base.train()
        grads.append(_lora_grads(b))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_checkpointed_backward_recomputes_in_the_forward_role():
    """A value forward inside ``use("value")`` whose loss is backpropagated after the block (PPO's separate
    critic does this): the checkpointed layers recompute in the value role, so every adapter gets the
    gradients it gets without checkpointing (before the fix the value adapter got the policy's)."""
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        b = _bundle(gradient_checkpointing=gc)
        b.add_adapter("value", LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for n, p in b.base.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        b.base.train()
        with b.use("policy"):
            with b.use("value"):
                h = b.hidden_states(IDS, MASK)
            h.square().mean().backward()  # policy active again
        grads.append({n: p.grad.clone() for n, p in b.base.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(".value." in k for k in grads[0]) and not any(".policy." in k for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)


def test_row_scales_give_each_row_its_own_rank_scaling():
    """Row b of the batch computes scale * B diag(s_b) A x: with s_b = 1 for every rank direction the
    output is the plain adapter's, with s_b = 0 the base's; other rows are untouched; a wrong row count and
    an unknown module are named."""
    torch.manual_seed(0)
    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig(r=4))
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, 0.2)
    ids = torch.tensor([[5, 6, 7, 8]] * 3)
    mask = torch.ones_like(ids)
    r = 4
    names = [n for n, *_ in b.lora_factors("policy")]
    with torch.no_grad():
        with b.use("policy"):
            plain = b.hidden_states(ids, mask)
            s = torch.tensor([[1.0] * r, [0.0] * r, [1.0] * r])
            with b.row_scales("policy", {n: s for n in names}):
                scaled = b.hidden_states(ids, mask)
                with b.use("reference"):  # adapters off inside the context: the base, no scaled adapter
                    base_inside = b.hidden_states(ids, mask)
            after = b.hidden_states(ids, mask)  # the hooks are gone
            with pytest.raises(ValueError, match="2 rows of scales"), b.row_scales("policy", {n: s[:2] for n in names}):
                b.hidden_states(ids, mask)
            with pytest.raises(KeyError, match="no LoRA module"), b.row_scales("policy", {"nope": s}):
                pass
        with b.use("reference"):
            base = b.hidden_states(ids, mask)
    assert torch.allclose(scaled[0], plain[0], atol=1e-6) and torch.allclose(scaled[2], plain[2], atol=1e-6)
    assert torch.allclose(scaled[1], base[1], atol=1e-6) and not torch.allclose(plain[1], base[1], atol=1e-3)
    assert torch.equal(after, plain) and torch.equal(base_inside, base)


def _row_scaled(dropout: float):
    """hidden states and d(sum)/d(scales) of a 3-row batch with random per-row scales, on a tiny bundle whose
    adapter has LoRA dropout ``dropout`` (0: the lean forward; > 0: peft's forward with the hook), in eval mode."""
    torch.manual_seed(0)
    b = ModelBundle.load(ModelConfig())
    b.add_adapter("policy", LoraConfig(r=4, dropout=dropout))
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, 0.2)
    b.base.eval()
    names = [n for n, *_ in b.lora_factors("policy")]
    ids = torch.tensor([[5, 6, 7, 8]] * 3)
    s = torch.rand(3, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    with b.use("policy"), b.row_scales("policy", {n: s for n in names}):
        lean = _forwards(b, "_lean_row_scaled_forward")
        h = b.hidden_states(ids, torch.ones_like(ids))
    h.sum().backward()
    assert not _forwards(b, "_lean_row_scaled_forward")  # the module's own forward restored ...
    assert _forwards(b, "_lean_forward") == names  # ... which is the bundle's lean LoRA forward
    return b, names, lean, h.detach(), s.grad, s.detach()


def _forwards(b, maker: str) -> list[str]:
    """The modules whose instance forward ``maker`` (a function of lowalign.bundle) made."""
    return [n for n, m in b.base.named_modules()
            if getattr(vars(m).get("forward"), "__qualname__", "").startswith(maker + ".")]


def test_row_scales_lean_forward_equals_peft_forward_with_hook_and_the_formula():
    """The lean row-scaled LoRA forward (base(x) + (A x * scale * s_row) B^T in one addmm) gives the values
    and gradients of peft's forward with A x scaled by a hook, and row b equals the plain adapter whose B is
    B diag(s_b): the formula, checked per row."""
    b, names, lean, h, g, s = _row_scaled(0.0)
    _, _, hooked, h_ref, g_ref, _ = _row_scaled(0.1)
    assert sorted(lean) == sorted(names) and hooked == []  # each path was the one exercised
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[5, 6, 7, 8]])
    Bs = {n: B.detach().clone() for n, _, B, _ in b.lora_factors("policy")}
    for row in range(3):
        with torch.no_grad():
            for n, _, B, _ in b.lora_factors("policy"):
                B.copy_(Bs[n] * s[row])
            with b.use("policy"):
                one = b.hidden_states(ids, torch.ones_like(ids))
        torch.testing.assert_close(h[row], one[0], rtol=1e-4, atol=1e-5)


def _effective_weight(b, mod_name, adapter="policy"):
    """What the LoRA module computes, as a (d_out, d_in) matrix: its base layer's weight plus scale * B A."""
    m = b.base.get_submodule(mod_name)
    return b.base_weight(mod_name) + float(m.scaling[adapter]) * m.lora_B[adapter].weight @ m.lora_A[adapter].weight


def test_loftq_start_is_the_best_rank_r_correction_of_the_nf4_error():
    from safetensors.torch import load_file

    full = load_file(str(TINY_DIR / "model.safetensors"))
    b = ModelBundle.load(ModelConfig(quantization="nf4"))
    b.add_adapter("policy", LoraConfig(r=4, alpha=8, init="loftq"))
    names = [n for n, *_ in b.lora_factors("policy")]
    assert names
    for name in names:
        w = full[name + ".weight"].float()
        q = b.base_weight(name)
        tail = torch.linalg.svdvals(w - q)[4:]  # Eckart-Young: the best rank-4 fit leaves these
        err = (w - _effective_weight(b, name)).norm()
        torch.testing.assert_close(err, tail.norm(), rtol=1e-3, atol=1e-5)
        assert err < (w - q).norm()
    # full rank: the policy computes the full-precision weight itself
    wide = ModelBundle.load(ModelConfig(quantization="nf4"))
    d = min(full[names[0] + ".weight"].shape)
    wide.add_adapter("policy", LoraConfig(r=d, alpha=d, init="loftq", target_modules=[names[0].split(".")[-1]]))
    name = next(n for n, *_ in wide.lora_factors("policy"))
    torch.testing.assert_close(_effective_weight(wide, name), full[name + ".weight"], rtol=0, atol=1e-4)


def test_loftq_frozen_ranks_hold_the_correction_and_fresh_ranks_train():
    """lora.loftq_rank = 4 with r = 2: six ranks; the first four are the rank-4 LoftQ correction and never move,
    the two on top start at B = 0 (the start is the rank-4 LoftQ model exactly) and train at scale alpha / r."""
    from safetensors.torch import load_file

    full = load_file(str(TINY_DIR / "model.safetensors"))
    b = ModelBundle.load(ModelConfig(quantization="nf4"))
    b.add_adapter("policy", LoraConfig(r=2, alpha=4, init="loftq", loftq_rank=4))
    ref = ModelBundle.load(ModelConfig(quantization="nf4"))
    ref.add_adapter("policy", LoraConfig(r=4, alpha=8, init="loftq"))  # the same scale 2, all four ranks LoftQ
    factors = b.lora_factors("policy")
    assert all(A.shape[0] == 6 and s == 2.0 for _, A, _, s in factors)
    name = factors[0][0]
    torch.testing.assert_close(_effective_weight(b, name), _effective_weight(ref, name), rtol=0, atol=1e-6)
    assert all(float(B[:, 4:].abs().max()) == 0 for _, _, B, _ in factors)
    before = {n: (A.detach().clone(), B.detach().clone()) for n, A, B, _ in factors}
    b.freeze_copy("policy")
    start = _logits(b, "policy")
    opt = torch.optim.Adam(b.adapter_parameters("policy"), lr=1e-2)
    for _ in range(2):
        with b.use("policy"):
            b.causal_lm(input_ids=IDS, attention_mask=MASK, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, A, B, _ in b.lora_factors("policy"):
        assert torch.equal(A[:4], before[n][0][:4]) and torch.equal(B[:, :4], before[n][1][:, :4])  # frozen
    assert any(float(B[:, 4:].abs().max()) > 0 for _, _, B, _ in b.lora_factors("policy"))  # fresh ranks trained
    assert (_logits(b, "policy") - start).abs().max() > 1e-3
    torch.testing.assert_close(_logits(b, "reference"), start, rtol=0, atol=0)  # the frozen copy: all six ranks
    del full


def test_loftq_reference_is_the_frozen_start():
    b = ModelBundle.load(ModelConfig(quantization="nf4"))
    b.add_adapter("policy", LoraConfig(r=4, alpha=8, init="loftq"))
    b.freeze_copy("policy")
    start = _logits(b, "policy")
    torch.testing.assert_close(_logits(b, "reference"), start, rtol=0, atol=0)
    _train_step(b, lr=1e-1)
    assert (_logits(b, "policy") - start).abs().max() > 1e-3
    torch.testing.assert_close(_logits(b, "reference"), start, rtol=0, atol=0)
    assert not any(p.requires_grad for p in b.adapter_parameters("init_reference"))


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_lean_lora_forward_equals_peft_forward_values_and_gradients(quantization):
    """Every plain LoRA Linear runs ``_lean_forward`` (one addmm): the same hidden states and LoRA gradients as
    peft's own forward, and the base alone in the reference role (adapters off: peft's path). On an nf4 base
    too, where peft's LoRA class is its bitsandbytes Linear4bit."""
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    b = ModelBundle.load(ModelConfig(quantization=quantization))
    b.add_adapter("policy", LoraConfig(r=4, alpha=8))
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, 0.2)
    names = [n for n, *_ in b.lora_factors("policy")]
    assert _forwards(b, "_lean_forward") == names
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 3, 4, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    params = b.adapter_parameters("policy")

    def run():
        with b.use("policy"):
            h = b.hidden_states(ids, mask)
        (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
        grads = [p.grad.clone() for p in params]
        b.base.zero_grad(set_to_none=True)
        with torch.no_grad(), b.use("reference"):
            ref = b.hidden_states(ids, mask)
        return h.detach(), grads, ref

    lean = run()
    saved = {m: vars(m).pop("forward") for m in b.base.modules() if "forward" in vars(m)}
    try:
        peft = run()
    finally:
        for m, f in saved.items():
            m.forward = f
    torch.testing.assert_close(lean[0], peft[0], rtol=1e-6, atol=1e-6)
    for g, g_ref in zip(lean[1], peft[1]):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(lean[2], peft[2]) and not torch.allclose(lean[0], lean[2], atol=1e-3)
    with torch.no_grad(), b.use("policy"):  # without autograd the LoRA update goes into the base output in place
        assert torch.equal(b.hidden_states(ids, mask), lean[0])


def test_cpu_quantized_load_does_not_keep_the_full_precision_file_mapped(tmp_path):
    """After an nf4 load on a CPU nothing of the model refers to its safetensors file any more, so the pages
    quantization read are not held in memory (the file is no longer in the process's mappings), and the
    copied full-precision tensors equal the file's."""
    pytest.importorskip("bitsandbytes")
    import gc
    import pathlib

    import transformers
    from safetensors.torch import load_file

    from lowalign.tiny import byte_tokenizer

    maps = pathlib.Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux) to see the process's file mappings")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    full = ModelBundle.load(ModelConfig(name_or_path=str(d)))  # float32: the weights are the mapped file
    assert str(d / "model.safetensors") in maps.read_text()
    del full
    gc.collect()
    assert str(d / "model.safetensors") not in maps.read_text()
    b = ModelBundle.load(ModelConfig(name_or_path=str(d), quantization="nf4"))
    assert str(d / "model.safetensors") not in maps.read_text()
    saved = load_file(str(d / "model.safetensors"))
    assert torch.equal(b.base.get_input_embeddings().weight, saved["model.embed_tokens.weight"])


def test_quantized_base_keeps_its_unquantized_weights_in_the_compute_dtype():
    """peft's prepare_model_for_kbit_training casts embeddings, norms and a tied head to fp32: on a GPU that
    doubled the embeddings' memory and carried the residual stream in fp32 (nf4 GRPO on Qwen2.5-1.5B peaked
    above bf16's). A bf16 nf4 base stays bf16 outside its 4-bit layers, frozen, and still trains its LoRA
    through gradient checkpointing."""
    b = _bundle(quantization="nf4", dtype="bfloat16", gradient_checkpointing=True)
    base = {n: p for n, p in b.base.named_parameters() if "lora_" not in n}
    assert {p.dtype for p in base.values()} == {torch.bfloat16, torch.uint8}  # uint8: the packed 4-bit weights
    assert b.base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in base.values())
    with b.use("policy"):
        loss = b.causal_lm(input_ids=IDS, attention_mask=MASK, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in b.adapter_parameters("policy")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
