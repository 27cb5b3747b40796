"""lowalign's decode loop (lowalign.generation.decode) against transformers' generate: the same tokens, with
each prompt's prefill shared by its group and finished rows leaving the batch."""

import torch

from lowalign.bundle import ModelBundle
from lowalign.config import LoraConfig, ModelConfig
from lowalign.generation import generate, rollout_cache, row_seed
from lowalign.tasks.arithmetic import ArithmeticTask


def _policy():
    b = ModelBundle.load(ModelConfig())
    torch.manual_seed(0)
    b.add_adapter("policy", LoraConfig(r=4, alpha=8))
    for _, _, B, _ in b.lora_factors("policy"):
        B.data.normal_(0, 0.05)
    return b


def test_decode_drops_finished_rows_and_samples_what_generate_samples():
    b = _policy()
    prompts = [r["prompt"] for r in ArithmeticTask().eval_rows()[:12]]
    seeds = [row_seed(11, i) for i in range(len(prompts) * 4)]
    with b.use("policy"):
        for kw in (dict(row_seeds=seeds, temperature=1.3), dict(do_sample=False), dict(row_seeds=seeds, top_k=5)):
            ours, hf = (generate(b, prompts, max_new_tokens=10, num_generations=4, engine=e, **kw)
                        for e in ("lowalign", "hf"))
            assert torch.equal(ours.completion_ids, hf.completion_ids), kw
            assert torch.equal(ours.completion_mask, hf.completion_mask)
            assert ours.texts == hf.texts
        lengths = ours.completion_mask.sum(1)
        assert lengths.min() < lengths.max() <= 10  # rows ended at different steps: the batch shrank
        ours, hf = (generate(b, prompts, max_new_tokens=10, do_sample=False, engine=e) for e in ("lowalign", "hf"))
        assert torch.equal(ours.completion_ids, hf.completion_ids)  # one completion per prompt (evaluation)
        ours, hf = (generate(b, prompts[:3], max_new_tokens=6, min_new_tokens=6, num_generations=2, engine=e,
                             row_seeds=seeds[:6]) for e in ("lowalign", "hf"))
        assert torch.equal(ours.completion_ids, hf.completion_ids) and ours.completion_ids.shape == (6, 6)


def test_the_head_sees_one_contiguous_position_per_row():
    """The prefill hands the lm_head only the prompts' last position, as a contiguous (B, 1, d) tensor:
    transformers' ``[:, -1:]`` slice is a strided view that torch's CPU linear ran 10x slower on in float32 and
    took seconds and gigabytes on in bfloat16."""
    b = _policy()
    prompts = [r["prompt"] for r in ArithmeticTask().eval_rows()[:5]]
    seen = []
    hook = b.causal_lm.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: seen.append((tuple(args[0].shape), args[0].is_contiguous())))
    try:
        with b.use("policy"):
            out = generate(b, prompts, max_new_tokens=4, min_new_tokens=4, num_generations=2, do_sample=False)
    finally:
        hook.remove()
    d = b.causal_lm.config.hidden_size
    assert seen[0] == ((5, 1, d), True)  # the prefill: the 5 distinct prompts, one position each
    assert all(c for _, c in seen) and len(seen) == out.completion_ids.shape[1]


def test_global_rng_sampling_draws_from_the_warped_distribution():
    """Without row seeds the loop samples from torch's global generator: reproducible under a seed, and a
    top_k of 1 is greedy."""
    b = _policy()
    prompts = [r["prompt"] for r in ArithmeticTask().eval_rows()[:6]]
    with b.use("policy"):
        torch.manual_seed(5)
        a = generate(b, prompts, max_new_tokens=8, num_generations=3)
        torch.manual_seed(5)
        c = generate(b, prompts, max_new_tokens=8, num_generations=3)
        greedy = generate(b, prompts, max_new_tokens=8, num_generations=3, do_sample=False)
        top1 = generate(b, prompts, max_new_tokens=8, num_generations=3, top_k=1)
    assert torch.equal(a.completion_ids, c.completion_ids)
    assert torch.equal(top1.completion_ids, greedy.completion_ids)


def test_rollout_cache_holds_what_dynamic_cache_holds():
    """The in-place cache layers return the same keys and values as transformers' concatenating ones through
    prefill, group repeat, steps past the reserved room, and dropping rows."""
    from transformers import DynamicCache

    cfg = ModelBundle.load(ModelConfig()).base.config
    ours, ref = rollout_cache(cfg, room=2), DynamicCache(config=cfg)
    assert type(ours.layers[0]) is not type(ref.layers[0])  # in place, not concatenating
    g = torch.Generator().manual_seed(0)

    def kv(rows, n):
        return torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g)

    k, v = kv(3, 5)
    for c in (ours, ref):
        c.update(k, v, 0)
        c.batch_repeat_interleave(2)
    for t in range(4):  # the 3rd and 4th step outgrow the room of 2
        if t == 2:
            for c in (ours, ref):
                c.batch_select_indices(torch.tensor([0, 2, 3, 5]))
        k, v = kv(6 if t < 2 else 4, 1)
        a, b = ours.update(k, v, 0), ref.update(k, v, 0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ours.get_seq_length() == ref.get_seq_length() == 9


def test_grouped_attention_equals_sdpa_on_whole_rows():
    """One decode step over B = 3 prompts x G = 4 rows, 6 query heads on 2 key heads: the grouped attention
    (each prompt's keys once, then each row's own) equals sdpa on each row's whole cache (its prompt's keys
    repeated in front of its own, left padding masked), with every row running and with rows finished; and
    the whole rows it hands an attention call it does not cover are that cache."""
    import torch.nn.functional as F

    from lowalign.generation import GroupedPrompt

    g = torch.Generator().manual_seed(0)
    B, G, h, R, d, P, t = 3, 4, 2, 3, 8, 5, 2
    pk, pv = torch.randn(B, h, P, d, generator=g), torch.randn(B, h, P, d, generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_mask[2, :1] = 0
    state = GroupedPrompt().share(G, prompt_mask)
    state.current = type("Layer", (), {"keys": pk, "values": pv})()
    for rows in (torch.arange(B * G), torch.tensor([0, 2, 3, 5, 9, 11])):  # all running; then some finished
        n = rows.numel()
        state.rows = rows
        q = torch.randn(n, h * R, 1, d, generator=g)
        k, v = torch.randn(n, h, t, d, generator=g), torch.randn(n, h, t, d, generator=g)
        got = state.attend(q, k, v, None)
        grp = rows // G
        whole_k, whole_v = torch.cat([pk[grp], k], 2), torch.cat([pv[grp], v], 2)
        keep = torch.cat([prompt_mask[grp].bool(), torch.ones(n, t, dtype=torch.bool)], 1)[:, None, None]
        want = F.scaled_dot_product_attention(q, whole_k.repeat_interleave(R, 1), whole_v.repeat_interleave(R, 1),
                                              attn_mask=keep).transpose(1, 2)
        assert got.shape == (n, 1, h * R, d)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        wk, wv, wm = state.whole_rows(k, v)
        assert torch.equal(wk, whole_k) and torch.equal(wv, whole_v) and torch.equal(wm, keep)


def test_grouped_cache_keeps_one_prompt_per_group():
    """The grouped cache holds the prefill's B prompts once; decode steps write each row's keys in place past
    the reserved room, finished rows leave, and the sequence length counts prompt and steps."""
    from lowalign.generation import grouped_prompt_cache

    cfg = ModelBundle.load(ModelConfig()).base.config
    cache = grouped_prompt_cache(cfg, room=2)
    g = torch.Generator().manual_seed(0)
    pk, pv = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    assert cache.update(pk, pv, 0)[0].shape == (3, 2, 5, 4)  # the prefill: returned and kept as they are
    cache.state.share(4, torch.ones(3, 5))
    seen = []
    for step in range(3):  # the 3rd step outgrows the room of 2
        if step == 2:
            cache.batch_select_indices(torch.tensor([0, 4, 7]))
            seen = [s[[0, 4, 7]] for s in seen]
        k = torch.randn(12 if step < 2 else 3, 2, 1, 4, generator=g)
        keys, _ = cache.update(k, k, 0)
        seen.append(k)
        assert torch.equal(keys, torch.cat(seen, 2))  # only the rows' own keys
        assert cache.state.current is cache.layers[0]
    assert torch.equal(cache.layers[0].keys, pk) and cache.get_seq_length() == 5 + 3


def test_a_decoder_that_drops_the_grouped_prompt_decodes_whole_rows(monkeypatch):
    """A decoder that does not pass its keyword arguments down to attention would attend to each row's own
    keys only: the first step notices (fewer grouped attention calls than layers written), redoes itself on
    whole rows, and the completions are still transformers' generate's."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from lowalign import generation as Gn

    b = _policy()
    prompts = [r["prompt"] for r in ArithmeticTask().eval_rows()[:6]]
    seeds = [row_seed(2, i) for i in range(len(prompts) * 3)]
    with b.use("policy"):
        want = generate(b, prompts, max_new_tokens=8, num_generations=3, engine="hf", row_seeds=seeds)
        assert Gn.GroupedPrompt.applies(b.base.config)  # so routed attention exists; now drop the keyword
        routed = ALL_ATTENTION_FUNCTIONS["sdpa"]
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", lambda *a, **k: routed(
            *a, **{n: v for n, v in k.items() if n != Gn.GROUPED_KWARG}))
        caches = []
        real = Gn.GroupedPrompt.whole_rows_cache
        monkeypatch.setattr(Gn.GroupedPrompt, "whole_rows_cache", lambda *a: caches.append(1) or real(*a))
        got = generate(b, prompts, max_new_tokens=8, num_generations=3, row_seeds=seeds)
    assert caches == [1]  # it fell back, once
    assert torch.equal(got.completion_ids, want.completion_ids)


def test_grouped_attention_in_bfloat16_is_as_close_to_float32_as_sdpa():
    """In bfloat16 the grouped attention computes scores, softmax and sums in float32 and rounds once: its
    output is no further from the float32 result than sdpa's own bfloat16 kernel (scores rounded to bfloat16
    before the softmax were 1.8x further)."""
    import torch.nn.functional as F

    from lowalign.generation import GroupedPrompt

    g = torch.Generator().manual_seed(1)
    B, G, h, R, d, P, t = 4, 8, 3, 3, 64, 40, 6
    pk, pv = (torch.randn(B, h, P, d, generator=g) * 2 for _ in range(2))
    q = torch.randn(B * G, h * R, 1, d, generator=g) * 2
    k, v = (torch.randn(B * G, h, t, d, generator=g) * 2 for _ in range(2))
    state = GroupedPrompt().share(G, torch.ones(B, P))
    grp = torch.arange(B * G) // G

    def sdpa(q, pk, pv, k, v):
        wk, wv = torch.cat([pk[grp], k], 2), torch.cat([pv[grp], v], 2)
        return F.scaled_dot_product_attention(q, wk.repeat_interleave(R, 1), wv.repeat_interleave(R, 1)).transpose(1, 2)

    exact = sdpa(q, pk, pv, k, v)
    bf = [x.bfloat16() for x in (q, pk, pv, k, v)]
    state.current = type("Layer", (), {"keys": bf[1], "values": bf[2]})()
    ours = state.attend(bf[0], bf[3], bf[4], None)
    assert ours.dtype == torch.bfloat16
    err_ours, err_sdpa = ((x.float() - exact).abs().max().item() for x in (ours, sdpa(*bf)))
    assert err_ours <= 1.05 * err_sdpa, (err_ours, err_sdpa)
