"""lowalign.prompt_sharing: run detection, the packed block mask (a worked example), when packing pays. The
paths' equality with whole rows (log-probs and gradients) is tested on every architecture skeleton in
test_architectures.py."""

import torch
import transformers

from lowalign.prompt_sharing import packed_mask, packing_pays, prompt_groups

from .algorithms.helpers import REPO


def test_prompt_groups():
    ids = torch.tensor([[0, 5], [0, 5], [7, 8], [7, 8]])
    mask = torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1]])
    assert prompt_groups(ids, mask) == (None, 2)  # a rollout's groups: already together
    assert prompt_groups(ids[:3], mask[:3]) == (None, 1)  # prompts repeated unequally
    assert prompt_groups(ids[1:3], mask[1:3]) == (None, 1)  # distinct prompts
    order, g = prompt_groups(ids[[0, 2, 1, 3]], mask[[0, 2, 1, 3]])  # chosen rows, then rejected rows
    assert g == 2 and order.tolist() == [0, 2, 1, 3]
    other_mask = mask.clone()
    other_mask[1, 0] = 1  # the same ids, other padding: another prompt
    assert prompt_groups(ids[:2], other_mask[:2]) == (None, 1)


def test_packed_mask_worked_example():
    """One prompt [pad, p] and two completions [a1, a2] and [b1, pad]: packed [pad, p, a1, a2, b1, pad']."""
    prompt_mask = torch.tensor([[0, 1], [0, 1]])
    completion_mask = torch.tensor([[1, 1], [1, 0]])
    want = torch.tensor([  # keys: pad p a1 a2 b1 pad'
        [1, 0, 0, 0, 0, 0],  # pad: itself only
        [0, 1, 0, 0, 0, 0],  # p
        [0, 1, 1, 0, 0, 0],  # a1: prompt, itself
        [0, 1, 1, 1, 0, 0],  # a2: prompt, a1, itself
        [0, 1, 0, 0, 1, 0],  # b1: prompt, itself (not a1, a2)
        [0, 1, 0, 0, 1, 1],  # pad': prompt, b1, itself
    ], dtype=torch.bool)
    got = packed_mask(prompt_mask, completion_mask, 2)
    assert got.shape == (1, 6, 6)
    assert torch.equal(got[0], want)


def test_packing_pays_for_long_prompts_and_short_completions_only():
    smollm2 = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                       num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152)
    assert packing_pays(smollm2, B=4, P=47, C=16, groups=4)  # the arithmetic task's chat prompts
    assert not packing_pays(smollm2, B=8, P=40, C=128, groups=8)  # long completions: attention grows more
    assert not packing_pays(smollm2, B=2, P=4, C=60, groups=2)


def test_planner_and_runtime_read_the_same_attention_width():
    """A model whose heads x head_dim is not its hidden size (Qwen3's head_dim 128): the planner's packed-pass
    estimate uses the width the runtime's packing_pays uses."""
    from lowalign.api import load_config
    from lowalign.models import text_sizes
    from lowalign.planner import _shape_from_config

    qwen3 = transformers.Qwen3Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=32,
                                     num_key_value_heads=2, num_hidden_layers=2, vocab_size=384)
    assert text_sizes(qwen3) == (64, 128, 64, 96, 2)
    cfg = load_config(REPO / "recipes/grpo_tiny.yaml")
    s = _shape_from_config(qwen3, cfg, "test")
    assert (s.hidden, s.attn_dim, s.kv_dim, s.intermediate, s.layers) == text_sizes(qwen3)


def test_packed_training_forward_under_gradient_checkpointing_gives_the_whole_rows_gradients():
    """The packed sequence's block mask reaches every checkpointed layer, in the forward and in the
    recompute: the built-in model with reentrant checkpointing, packed against whole rows."""
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.generation import generate, row_seed
    from lowalign.logprobs import logprobs_from_hidden
    from lowalign.prompt_sharing import packed_prompt_hidden_states

    b = ModelBundle.load(ModelConfig(name_or_path="builtin:tiny", dtype="float32", gradient_checkpointing=True))
    torch.manual_seed(0)
    b.add_adapter("policy", LoraConfig(r=4, alpha=8))
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, 0.05)
    b.base.train()
    assert b.base.is_gradient_checkpointing
    with b.use("policy"):
        roll = generate(b, ["12+7=", "3+45="], max_new_tokens=6, num_generations=3,
                        row_seeds=[row_seed(1, i) for i in range(6)])
        params = b.adapter_parameters("policy")
        grads = []
        for packed in (False, True):
            h = (packed_prompt_hidden_states(b, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                             roll.completion_mask, 3) if packed
                 else b.hidden_states(roll.input_ids, roll.attention_mask))
            lp = logprobs_from_hidden(b, h, roll.input_ids, roll.target_mask).logps
            (lp * torch.linspace(-1, 1, lp.shape[1])).sum().backward()
            grads.append([p.grad.clone() for p in params])
            b.base.zero_grad(set_to_none=True)
    assert any(float(g.abs().max()) > 0 for g in grads[0])
    for g_whole, g_packed in zip(*grads):
        torch.testing.assert_close(g_packed, g_whole, rtol=1e-4, atol=1e-6)


def test_rows_with_their_own_adapter_scales_are_never_regrouped():
    """Inside ``row_scales`` each batch row is its own adapter variant (ESSA's members): rows sharing a prompt
    must not share its forward, so the whole rows run (the sharing path would give every row its group's
    first variant)."""
    from lowalign.bundle import ModelBundle
    from lowalign.config import LoraConfig, ModelConfig
    from lowalign.generation import encode_completions
    from lowalign.prompt_sharing import completion_hidden_states

    b = ModelBundle.load(ModelConfig(name_or_path="builtin:tiny", dtype="float32"))
    torch.manual_seed(0)
    b.add_adapter("policy", LoraConfig(r=4, alpha=8))
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, 0.5)
    r = encode_completions(b.tokenizer, ["12+7="] * 4, ["19", "18", "19", "20"], b.device)
    scales = {name: torch.randn(4, 4) for name, *_ in b.lora_factors("policy")}
    with torch.no_grad(), b.use("policy"), b.row_scales("policy", scales):
        got = completion_hidden_states(b, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        want = b.hidden_states(r.input_ids, r.attention_mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got[0, :r.prompt_ids.shape[1]], got[1, :r.prompt_ids.shape[1]])  # variants differ
