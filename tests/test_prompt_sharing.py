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


def test_packing_pays_at_any_length_block_by_block_and_for_short_completions_on_a_dense_mask():
    smollm2 = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                       num_key_value_heads=3, num_hidden_layers=30, vocab_size=49152)
    smollm2._attn_implementation = "eager"  # the dense mask: the packed row's attention grows as (P + g C)^2
    assert packing_pays(smollm2, B=4, P=47, C=16, groups=4)  # the arithmetic task's chat prompts
    assert not packing_pays(smollm2, B=8, P=40, C=128, groups=8)  # long completions: attention grows more
    assert not packing_pays(smollm2, B=2, P=4, C=60, groups=2)
    smollm2._attn_implementation = "sdpa"  # block by block: attention as on whole rows, the prompt once
    assert packing_pays(smollm2, B=8, P=40, C=128, groups=8)
    assert not packing_pays(smollm2, B=2, P=4, C=60, groups=2)  # a 4-token prompt saves too little


def test_packed_cost_worked_example():
    """hidden 1, attention width 1, kv 1, intermediate 1: 14 FLOPs per token, 4 per query-key pair. B = 4 rows
    of P = 2 + C = 3 in groups of 2: whole rows 4 * 5 * 14 + 4 * 25 * 4 = 680; packed, 2 rows of 2 + 6 tokens:
    2 * 8 * 14 = 224 plus block pairs 2 * (4 + 2 * 3 * 5) * 4 = 272 (dense: 2 * 64 * 4 = 512)."""
    from lowalign.prompt_sharing import packed_cost

    assert packed_cost(1, 1, 1, 1, B=4, P=2, C=3, groups=2) == (224 + 272) / 680
    assert packed_cost(1, 1, 1, 1, B=4, P=2, C=3, groups=2, block=False) == (224 + 512) / 680


def test_block_masks_are_the_packed_mask_cut_into_blocks():
    """The worked example's packed mask, read back out of :func:`block_masks`' prompt and completion blocks."""
    from lowalign.prompt_sharing import block_masks

    prompt_mask = torch.tensor([[0, 1], [0, 1]])
    completion_mask = torch.tensor([[1, 1], [1, 0]])
    dense = packed_mask(prompt_mask, completion_mask, 2)[0]
    lay = block_masks(dense[None], 2, 2, 2)
    assert lay.prompt_mask.shape == (1, 1, 2, 2) and lay.completion_mask.shape == (2, 1, 2, 4)
    assert torch.equal(lay.prompt_mask[0, 0], dense[:2, :2])
    for j in range(2):  # completion j's queries: [prompt keys; its own keys]
        rows = dense[2 + 2 * j:4 + 2 * j]
        assert torch.equal(lay.completion_mask[j, 0], torch.cat([rows[:, :2], rows[:, 2 + 2 * j:4 + 2 * j]], 1))
        others = torch.cat([rows[:, 2:2 + 2 * j], rows[:, 4 + 2 * j:]], 1)
        assert not others.any()  # nothing outside the blocks was visible


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


def test_packed_attention_equals_sdpa_on_the_dense_mask():
    """Block by block equals one dense attention under :func:`packed_mask` (the spec), values and gradients,
    on odd sizes with grouped-query heads (6 query heads on 2 key/value heads), left-padded prompts and
    right-padded completions; rows whose query sees only itself included. Without a layout it is sdpa."""
    import torch.nn.functional as F

    from lowalign import prompt_sharing as S

    assert S._install_packed_attention()
    torch.manual_seed(0)
    n, g, P, C, heads, kv_heads, d = 2, 3, 5, 4, 6, 2, 7
    prompt_mask = torch.ones(n * g, P, dtype=torch.long)
    prompt_mask[3:, :2] = 0  # the second prompt is left-padded
    completion_mask = torch.ones(n * g, C, dtype=torch.long)
    completion_mask[1, 2:] = 0
    completion_mask[5, 1:] = 0
    L = P + g * C
    q = torch.randn(n, heads, L, d, requires_grad=True)
    k = torch.randn(n, kv_heads, L, d, requires_grad=True)
    v = torch.randn(n, kv_heads, L, d, requires_grad=True)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    dense = packed_mask(prompt_mask, completion_mask, g)[:, None]
    got, _ = S.packed_attention(module, q, k, v, dense, dropout=0.0, scaling=0.3,
                                **{S.LAYOUT_KWARG: S.block_masks(dense[:, 0], P, C, g)})
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=dense,
                                          scale=0.3).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(want)
    grads_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    grads_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain, _ = S.packed_attention(module, q, k, v, dense, dropout=0.0, scaling=0.3)  # no layout: sdpa
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-6)
