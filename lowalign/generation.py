"""Rollouts from the training weights: HF generation with a KV cache on the bundle in its current role
(no merged copy, no second model), left-padded prompts, stop at EOS."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right padded after EOS
    completion_mask: torch.Tensor  # (B, C) 1 up to and including the first EOS
    texts: list[str]  # decoded completions (special tokens dropped)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout of the rows where the (B,) bool mask ``rows`` is true (prompt padding kept)."""
        idx = rows.nonzero().flatten().tolist()
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                       self.completion_mask[idx], [self.texts[i] for i in idx])

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], 1)

    @property
    def target_mask(self) -> torch.Tensor:
        """(B, P + C) mask of the completion tokens, aligned with input_ids."""
        return torch.cat([torch.zeros_like(self.prompt_mask), self.completion_mask], 1)


def _appends_eos(tok) -> bool:
    ids = tok("a").input_ids
    return tok.eos_token_id is not None and len(ids) > 0 and ids[-1] == tok.eos_token_id


def encode_prompts(tok, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids. Keeps a tokenizer's BOS but never lets it append EOS (ByT5 does)."""
    special = not _appends_eos(tok)
    enc = tok(texts, add_special_tokens=special, padding=True, return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def completion_mask_from_ids(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it: (B, C)."""
    is_eos = ids == eos_id
    after = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # EOSes strictly before each position
    return (after == 0).long()


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of row ``row`` (its index in the step's whole batch) of a batch seeded ``seed``."""
    x = (seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + 1) % 2**64  # splitmix64 finalizer
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**63


class RowSeededSampler:
    """A logits processor that samples each row from its own random stream, so a completion depends only
    on its prompt, the weights and its row seed, never on which other rows share the batch (rank shards,
    chunked generation): data-parallel ranks sample exactly what one process samples.

    Inverse-CDF sampling: at new token t, row i draws u = 1 - U_i[t] in (0, 1] (``U_i`` uniform, from a
    generator seeded ``seeds[i]``), warps its logits (temperature, top-k, top-p, as HF's sampler does) and
    takes the first token whose cumulative probability reaches u * (total mass); a token of probability 0 is
    never taken. The chosen token is returned as the only finite logit, so greedy decoding emits it.
    """

    def __init__(self, seeds: list[int], prompt_len: int, max_new_tokens: int, *, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0):
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.u = torch.stack([1.0 - torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                               dtype=torch.float64) for s in seeds])  # (B, T) in (0, 1]
        self.prompt_len = prompt_len
        warp = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        if top_k:
            warp.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warp.append(TopPLogitsWarper(top_p))
        self.warp = LogitsProcessorList(warp)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_len
        w = self.warp(input_ids, scores).float()
        # unnormalized cdf = cumsum(exp(w - max)): one [rows, vocab] buffer, exp and cumsum in place
        cdf = torch.sub(w, w.amax(-1, keepdim=True)).exp_()
        torch.cumsum(cdf, -1, out=cdf)
        u = self.u[:, t].to(cdf.device, torch.float32)[:, None] * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)
        del cdf, w
        return scores.fill_(float("-inf")).scatter_(1, tok, 0.0)  # HF hands the processor its own fp32 copy


@torch.no_grad()
def generate(bundle, prompts: list[str], *, max_new_tokens: int, do_sample: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, num_generations: int = 1,
             row_seeds: list[int] | None = None, share_prefill: bool = True, min_new_tokens: int = 0) -> Rollout:
    """Sample ``num_generations`` completions per prompt (rows grouped by prompt, contiguous). With
    ``row_seeds`` (one per completion), each row samples from its own seeded stream
    (:class:`RowSeededSampler`) instead of the global RNG.

    With ``num_generations > 1`` and ``share_prefill``, each prompt's prefix (all but its last token) runs once
    (:func:`prefill`) and its KV cache is repeated to the group's rows; generation then feeds only the last
    prompt token of each row. The unshared path (``share_prefill=False``) computes every row's prompt again:
    G times the prefill work for the same completions."""
    tok = bundle.tokenizer
    model = bundle.causal_lm
    ids, mask = encode_prompts(tok, prompts, bundle.device)
    was_training = model.training
    model.eval()
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
              use_cache=True)
    if min_new_tokens:  # benchmarks: every row does the same work
        kw["min_new_tokens"] = min_new_tokens
    if num_generations > 1:
        if share_prefill and ids.shape[1] > 1:
            kw[cache_kwarg(model)] = prefill(model, ids[:, :-1], mask[:, :-1], repeats=num_generations)
        ids = ids.repeat_interleave(num_generations, 0)
        mask = mask.repeat_interleave(num_generations, 0)
    if do_sample and row_seeds is not None:
        if len(row_seeds) != ids.shape[0]:
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {ids.shape[0]} completions")
        sampler = RowSeededSampler(row_seeds, ids.shape[1], max_new_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k)
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=[sampler])
    elif do_sample:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    if was_training:
        model.train()
    comp = out[:, ids.shape[1]:]
    if comp.shape[1] == 0:
        comp = torch.full((ids.shape[0], 1), tok.eos_token_id, device=ids.device, dtype=ids.dtype)
    cmask = completion_mask_from_ids(comp, tok.eos_token_id)
    comp = torch.where(cmask.bool(), comp, torch.full_like(comp, tok.pad_token_id))
    texts = tok.batch_decode(comp, skip_special_tokens=True)
    return Rollout(ids, mask, comp, cmask, texts)


def cache_kwarg(module) -> str:
    """The keyword a model's forward (and so its generate) takes a KV cache by: ``cache`` in transformers 5.2x,
    ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@torch.no_grad()
def prefill(model, ids: torch.Tensor, mask: torch.Tensor, *, repeats: int = 1):
    """The KV cache of left-padded ``ids`` (B, P) under the active adapter, each row's cache repeated
    ``repeats`` times (rows grouped, as ``repeat_interleave``): B prompts computed once for B * repeats
    completions. Positions are the ones generation gives the same rows (the mask's running count), so the cache
    is what generation would have built for each row; only the backbone runs (no logits)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_decoder()
    decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kwarg(decoder): cache})
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
    return cache


def encode_completions(tok, prompts: list[str], completions: list[str], device) -> Rollout:
    """Teacher-forcing batch: left-padded prompts + right-padded ``completion + EOS`` (same layout as a
    rollout, so the same log-prob code serves SFT, DPO and GRPO)."""
    ids, mask = encode_prompts(tok, prompts, device)
    comp = [tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id] for c in completions]
    C = max(map(len, comp))
    cids = torch.full((len(comp), C), tok.pad_token_id, dtype=torch.long)
    cmask = torch.zeros(len(comp), C, dtype=torch.long)
    for i, c in enumerate(comp):
        cids[i, :len(c)] = torch.tensor(c)
        cmask[i, :len(c)] = 1
    return Rollout(ids, mask, cids.to(device), cmask.to(device), list(completions))
