"""Every common architecture right by default, on tiny random-weight configs saved locally (from_config, a
local byte tokenizer): fused log-probs equal transformers' (plain, left-padded, with LoRA, with LoRA on the
head), LoRA targets resolve to the model's own projections, one GRPO and one DPO step run with policy ==
reference at step 1 (dropout off), and the saved adapter reloads in plain peft with equal logits."""


import pytest
import torch

from .algorithms.helpers import cli, metrics, one_grpo_and_one_dpo_step

COMMON = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=None)
ARCHS = {  # name: (config class, extra kwargs, expected `auto` LoRA targets)
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False), "qkvo+mlp"),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True), "qkvo+mlp"),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), "qkvo+mlp"),
    "qwen3": ("Qwen3Config", dict(head_dim=8), "qkvo+mlp"),
    "mistral": ("MistralConfig", dict(), "qkvo+mlp"),
    # a small softcap, so that random-weight logits actually reach the tanh's bend
    "gemma2": ("Gemma2Config", dict(head_dim=8, final_logit_softcapping=0.5, attn_logit_softcapping=50.0),
               "qkvo+mlp"),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=8), "qkvo+mlp"),
    "phi3": ("Phi3Config", dict(resid_pdrop=0.1, attention_dropout=0.1), ["down_proj", "gate_up_proj", "o_proj",
                                                                          "qkv_proj"]),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, vocab_size=384, pad_token_id=0,
                                eos_token_id=1, bos_token_id=None, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
             ["c_attn", "c_fc", "c_proj"]),
}
QKVO_MLP = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
IDS = [[84, 61, 35, 55, 58, 46, 54, 59, 64, 35, 68, 61], [84, 61, 35, 52, 46, 53, 64, 35, 68, 61, 55, 52]]


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory):
    return arch_dirs(tmp_path_factory)


def arch_dirs(tmp_path_factory):
    """``get(name)``: the directory of ARCHS[name] saved with random weights and the byte tokenizer (once)."""
    made = {}

    def get(name):
        if name not in made:
            import transformers
            from transformers import AutoModelForCausalLM

            from lowalign.tiny import byte_tokenizer

            cls_name, extra, _ = ARCHS[name]
            kw = extra if name == "gpt2" else {**COMMON, **extra}
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kw))
            d = tmp_path_factory.mktemp(name)
            model.save_pretrained(d)
            byte_tokenizer().save_pretrained(d)
            made[name] = d
        return made[name]

    return get


def _bundle(path, targets="auto", r=4, noise=0.05):
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig

    b = ModelBundle.load(ModelConfig(name_or_path=str(path), dtype="float32"))
    b.add_adapter("policy", LoraConfig(r=r, alpha=2 * r, target_modules=targets))
    torch.manual_seed(1)
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, noise)
    return b


def _hf_token_logps(b, ids, mask, softcap_expected):
    """transformers' own forward (its softcapping, peft's LoRA layers) -> log-probs of each next token."""
    from lowalign.bundle import position_ids_from_mask

    logits = b.causal_lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    if softcap_expected:
        assert logits.abs().max() <= softcap_expected + 1e-5  # transformers did cap
    lp = torch.log_softmax(logits.float()[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return lp


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_fused_logprobs_equal_transformers(name, arch_dir):
    from lowalign.logprobs import token_logprobs
    from lowalign.models import linear_module_names

    path = arch_dir(name)
    b = _bundle(path)
    expected = ARCHS[name][2]
    assert b.adapter_configs["policy"].target_modules == "auto"
    got_targets = sorted({n.rsplit(".", 1)[-1] for n, *_ in b.lora_factors("policy")})
    assert got_targets == (QKVO_MLP if expected == "qkvo+mlp" else expected)
    head = b.base.get_output_embeddings()
    head_name = [n for n, m in b.base.named_modules() if m is head][0].rsplit(".", 1)[-1]
    b_head = _bundle(path, targets=[*linear_module_names(b.base), head_name])  # LoRA on the head too
    assert b_head.lm_head().lora_a is not None
    softcap = ARCHS[name][1].get("final_logit_softcapping")
    assert b.lm_head().softcap == softcap

    ids = torch.tensor(IDS)
    full = torch.ones_like(ids)
    left = full.clone()
    left[1, :4] = 0  # left padding
    ids_left = ids.clone()
    ids_left[1, :4] = 0
    with torch.no_grad():
        for bundle, role in ((b, "reference"), (b, "policy"), (b_head, "policy")):
            for x, mask in ((ids, full), (ids_left, left)):
                tmask = mask.clone()
                tmask[:, 0] = 0
                tmask[1, :5] = 0  # first attended token has no prefix
                with bundle.use(role), bundle.eval_mode():
                    ours = token_logprobs(bundle, x, mask, tmask).logps[:, 1:]
                    theirs = _hf_token_logps(bundle, x, mask, softcap)
                sel = tmask[:, 1:].bool()
                err = (ours[sel] - theirs[sel]).abs().max().item()
                assert err < 1e-5, f"{name} {role} {'left-padded' if (mask == 0).any() else 'plain'}: {err}"


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_saved_adapter_reloads_in_plain_peft(name, arch_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = arch_dir(name)
    b = _bundle(path)
    b.save_adapter("policy", tmp_path / "policy")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "policy").eval()
    ids = torch.tensor(IDS)
    with torch.no_grad(), b.use("policy"), b.eval_mode():
        ours = b.causal_lm(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


STEP = ["train.steps=1", "eval.num_examples=4", "eval.max_new_tokens=4", "threads=1", "train.checkpoint_every=0",
        "model.dtype=float32"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_one_grpo_and_one_dpo_step(name, arch_dir, tmp_path):
    """Policy == reference at step 1 for every architecture (fresh LoRA, dropout off): GRPO's KL is 0 and DPO's
    loss is ln 2, dropout-bearing GPT-2 and Phi-3 included."""
    one_grpo_and_one_dpo_step(arch_dir(name), tmp_path, "model.dtype=float32")


def test_dropout_left_on_makes_policy_differ_from_reference(arch_dir, tmp_path):
    """The contrast to the default: GPT-2 with model.disable_dropout=false has KL > 0 at step 1."""
    cli("run", "recipes/grpo_tiny.yaml", f"model.name_or_path={arch_dir('gpt2')}", f"output_dir={tmp_path / 'g'}",
        "train.beta=0.04", "train.prompts_per_step=2", "train.num_generations=2", "train.max_new_tokens=4",
        "model.disable_dropout=false", *STEP)
    assert metrics(tmp_path / "g")[0]["kl"] > 1e-5  # 6e-4 measured; exactly 0.0 with dropout off


def test_validate_gemma2_typo_in_targets_names_the_modules(arch_dir, tmp_path):
    p = cli("validate", "recipes/grpo_tiny.yaml", f"model.name_or_path={arch_dir('gemma2')}",
            "lora.target_modules=[q_proj, qv_proj]", check=False)
    assert p.returncode == 2
    assert "['qv_proj'] match no module of Gemma2ForCausalLM" in p.stderr
    assert "'k_proj', 'o_proj', 'q_proj'" in p.stderr and "Loading weights" not in p.stderr
    p = cli("run", "recipes/grpo_tiny.yaml", f"model.name_or_path={arch_dir('gemma2')}",
            "lora.target_modules=[qv_proj]", f"output_dir={tmp_path / 'run'}", check=False)
    assert p.returncode == 2 and not (tmp_path / "run").exists() and "Loading weights" not in p.stderr


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_base_weight_is_the_layers_weight(arch_dir, arch):
    """ModelBundle.base_weight reads what the layer under each LoRA module applies: the Linear's weight, the
    transpose of GPT-2's Conv1D weight (stored (d_in, d_out))."""
    b = _bundle(arch_dir(arch))
    for name, A, B, _ in b.lora_factors("policy"):
        layer = b.base.get_submodule(name).get_base_layer()
        w = layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight
        W = b.base_weight(name)
        assert W.shape == (B.shape[0], A.shape[1])
        torch.testing.assert_close(W, w.float(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b.base_weight(name, chunk=5), W, atol=1e-6, rtol=0)  # columns in blocks of 5


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_shared_prefill_samples_what_the_unshared_path_samples(name, arch_dir, monkeypatch):
    """Each prompt's prefill once, its keys read once per group by each step's attention (or, with sliding
    windows, its KV cache repeated to the group): the same sampled tokens (row-seeded) and greedy tokens as
    computing every row's prompt, hence the same log-probs; prompts of unequal length (left padding)."""
    from lowalign.generation import GroupedPrompt, generate, row_seed
    from lowalign.logprobs import token_logprobs

    b = _bundle(arch_dir(name))
    prompts = ["12+7=", "3+45=19", "9=", "hello there, 5+5="]
    seeds = [row_seed(7, i) for i in range(len(prompts) * 4)]
    grouped = []
    attend = GroupedPrompt.attend
    monkeypatch.setattr(GroupedPrompt, "attend", lambda self, *a: grouped.append(1) or attend(self, *a))
    with b.use("policy"):
        for kw in (dict(do_sample=False), dict(row_seeds=seeds)):  # sampled last: its rollouts are scored below
            shared, plain = (generate(b, prompts, max_new_tokens=6, num_generations=4, engine=e, **kw)
                             for e in ("lowalign", "hf"))
            assert torch.equal(shared.prompt_ids, plain.prompt_ids)
            assert torch.equal(shared.completion_ids, plain.completion_ids)
            assert torch.equal(shared.completion_mask, plain.completion_mask)
        assert shared.completion_ids.unique(dim=0).shape[0] > len(prompts)  # samples differ within groups
        lp_shared, lp_plain = (token_logprobs(b, r.input_ids, r.attention_mask, r.target_mask).logps
                               for r in (shared, plain))
    torch.testing.assert_close(lp_shared, lp_plain, rtol=0, atol=0)
    sliding = getattr(b.base.config.get_text_config(), "sliding_window", None) is not None
    assert bool(grouped) == (not sliding)  # every full-attention model decodes grouped


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_shared_prompt_forwards_equal_whole_rows(name, arch_dir, monkeypatch):
    """Rows sharing a prompt compute it once (lowalign.prompt_sharing): without gradients from a cached prompt,
    with them from one packed sequence per run. Both give the whole rows' log-probs, in the policy and the
    reference role, and the packed one the same LoRA gradients; prompts of unequal length (left padding),
    completions ended early (right padding). Sliding-window models decline both and score whole rows."""
    from lowalign import prompt_sharing as S
    from lowalign.generation import generate, row_seed
    from lowalign.logprobs import logprobs_from_hidden

    b = _bundle(arch_dir(name))
    b.base.train()  # dropout is off (lowalign's default); the trainers forward in train mode
    prompts = ["12+7=", "3+45=19", "9=", "hello there, 5+5="]
    with b.use("policy"):
        roll = generate(b, prompts, max_new_tokens=8, num_generations=4,
                        row_seeds=[row_seed(3, i) for i in range(16)])
    assert S.prompt_groups(roll.prompt_ids, roll.prompt_mask) == (None, 4)
    sliding = getattr(b.base.config.get_text_config(), "sliding_window", None) is not None
    parts = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)

    def logps(h):
        return logprobs_from_hidden(b, h, roll.input_ids, roll.target_mask).logps

    for role in ("policy", "reference"):
        with torch.no_grad(), b.use(role):
            whole = logps(b.hidden_states(roll.input_ids, roll.attention_mask))
            h = S.cached_prompt_hidden_states(b, *parts, 4)
            assert (h is None) == sliding
            torch.testing.assert_close(logps(S.completion_hidden_states(b, *parts)), whole, rtol=1e-5, atol=1e-5)
    dense_calls, block_calls = [], []

    def spy(module, query, key, value, attention_mask, *a, **k):  # which masks the attention calls saw
        if attention_mask is not None and attention_mask.shape[-1] == query.shape[2] == packed_len:
            dense_calls.append(query.shape)  # the packed row on its dense (L, L) mask: the blocks were not used
        elif query.shape[2] == roll.completion_ids.shape[1] and key.shape[2] == roll.input_ids.shape[1]:
            block_calls.append(query.shape)  # a completion block on [prompt; itself]
        return sdpa(module, query, key, value, attention_mask, *a, **k)

    packed_len = roll.prompt_ids.shape[1] + 4 * roll.completion_ids.shape[1]
    S._install_packed_attention()
    sdpa = S._SDPA
    monkeypatch.setattr(S, "_SDPA", spy)
    with b.use("policy"):
        params = b.adapter_parameters("policy")
        lps, grads = [], []
        for packed in (False, True):
            h = S.packed_prompt_hidden_states(b, *parts, 4) if packed else b.hidden_states(roll.input_ids,
                                                                                         roll.attention_mask)
            if packed and h is not None and S.packing_mode(b.base.config) == "block":  # forward and recompute: blocks
                layers = b.base.config.get_text_config().num_hidden_layers
                assert not dense_calls and len(block_calls) == layers, (len(dense_calls), len(block_calls))
            if h is None:
                assert sliding
                break
            lps.append(logps(h))
            (lps[-1] * torch.linspace(-1, 1, lps[-1].shape[1])).sum().backward()
            grads.append([p.grad.clone() for p in params])
            b.base.zero_grad(set_to_none=True)
        if len(lps) == 2:
            torch.testing.assert_close(lps[1], lps[0], rtol=1e-5, atol=1e-5)
            for g_whole, g_packed in zip(*grads):
                torch.testing.assert_close(g_packed, g_whole, rtol=1e-4, atol=1e-5)
            # a prompt's rows apart (as DPO's chosen and rejected halves are): grouped, computed, put back
            mixed = torch.arange(16).view(4, 4).T.flatten()
            h = S.completion_hidden_states(b, *(x[mixed] for x in parts))
            torch.testing.assert_close(logprobs_from_hidden(b, h, roll.input_ids[mixed], roll.target_mask[mixed]).logps,
                                       lps[0][mixed].detach(), rtol=1e-5, atol=1e-5)
    assert bool((whole != 0).any())
