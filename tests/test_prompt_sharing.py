"""lowalign.prompt_sharing: run detection, the packed block mask (a worked example), when packing pays. The
paths' equality with whole rows (log-probs and gradients) is tested on every architecture skeleton in
test_architectures.py."""

import torch
import transformers

from lowalign.prompt_sharing import packed_mask, packing_pays, prompt_groups


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
