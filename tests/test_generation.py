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
