"""Rollouts from the training weights: HF generation with a KV cache on the bundle in its current role
(no merged copy, no second model), left-padded prompts, stop at EOS."""

from __future__ import annotations

import functools
import inspect
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


def warpers(temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
    """transformers' logits warpers (temperature, top-k, top-p, in its sampler's order) as one callable."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warp = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        warp.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warp.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(warp)


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
        self.u = torch.stack([1.0 - torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                               dtype=torch.float64) for s in seeds])  # (B, T) in (0, 1]
        self.prompt_len = prompt_len
        self.warp = warpers(temperature, top_p, top_k)

    def pick(self, scores: torch.Tensor, t: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The (n,) tokens of new-token step ``t`` for ``rows`` (indices into the seeds; all rows when None),
        from their (n, vocab) logits."""
        w = self.warp(None, scores.float())
        # unnormalized cdf = cumsum(exp(w - max)): one [rows, vocab] buffer, exp and cumsum in place
        cdf = torch.sub(w, w.amax(-1, keepdim=True)).exp_()
        del w
        torch.cumsum(cdf, -1, out=cdf)
        u = self.u[:, t] if rows is None else self.u[rows.cpu(), t]
        u = u.to(cdf.device, torch.float32)[:, None] * cdf[:, -1:]
        return torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1).squeeze(1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """As a transformers logits processor: the chosen token is the only finite logit."""
        tok = self.pick(scores, input_ids.shape[1] - self.prompt_len)
        return scores.fill_(float("-inf")).scatter_(1, tok[:, None], 0.0)  # HF hands it its own fp32 copy


@torch.no_grad()
def generate(bundle, prompts: list[str], *, max_new_tokens: int, do_sample: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, num_generations: int = 1,
             row_seeds: list[int] | None = None, engine: str = "lowalign", min_new_tokens: int = 0) -> Rollout:
    """Sample ``num_generations`` completions per prompt (rows grouped by prompt, contiguous). With
    ``row_seeds`` (one per completion), each row samples from its own seeded stream
    (:class:`RowSeededSampler`) instead of the global RNG; without, from the global one (``do_sample``) or
    greedily.

    ``engine``: ``"lowalign"`` (:func:`decode`: each distinct prompt's prefill once, its keys read once per
    group at every step; finished rows leave the batch) or ``"hf"`` (transformers' ``generate`` on every row's
    prompt: the reference path, and the one used inside :meth:`ModelBundle.row_scales`, where rows cannot be
    dropped). Greedy and row-seeded completions are the same tokens on both up to float rounding (equal on the
    nine architecture skeletons of the tests; on SmolLM2, 64 rows x 16 sampled tokens, 2 rows take another
    token at some step, as they did when the prompt's keys were repeated to the rows)."""
    if engine not in ("lowalign", "hf"):
        raise ValueError(f"engine: '{engine}' is not one of lowalign, hf")
    tok = bundle.tokenizer
    model = bundle.causal_lm
    ids, mask = encode_prompts(tok, prompts, bundle.device)
    n_rows = ids.shape[0] * num_generations
    if row_seeds is not None and do_sample and len(row_seeds) != n_rows:
        raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {n_rows} completions")
    sampler = (RowSeededSampler(row_seeds, ids.shape[1], max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k) if do_sample and row_seeds is not None else None)
    was_training = model.training
    model.eval()
    try:
        if engine == "lowalign" and not bundle.rows_pinned:
            if sampler is not None:
                pick = sampler.pick
            elif do_sample:
                warp = warpers(temperature, top_p, top_k)

                def pick(scores, t, rows):
                    return torch.multinomial(torch.softmax(warp(None, scores.float()), -1), 1).squeeze(1)
            else:
                def pick(scores, t, rows):
                    return scores.argmax(-1)
            comp = decode(model, ids, mask, groups=num_generations, max_new_tokens=max_new_tokens, pick=pick,
                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, min_new_tokens=min_new_tokens)
        else:
            kw = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      use_cache=True, do_sample=do_sample and sampler is None, temperature=None, top_p=None,
                      top_k=None)
            if min_new_tokens:  # benchmarks: every row does the same work
                kw["min_new_tokens"] = min_new_tokens
            if sampler is not None:
                kw["logits_processor"] = [sampler]
            elif do_sample:
                kw.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
            comp = model.generate(input_ids=ids.repeat_interleave(num_generations, 0),
                                  attention_mask=mask.repeat_interleave(num_generations, 0), **kw)[:, ids.shape[1]:]
    finally:
        if was_training:
            model.train()
    ids, mask = ids.repeat_interleave(num_generations, 0), mask.repeat_interleave(num_generations, 0)
    if comp.shape[1] == 0:
        comp = torch.full((ids.shape[0], 1), tok.eos_token_id, device=ids.device, dtype=ids.dtype)
    cmask = completion_mask_from_ids(comp, tok.eos_token_id)
    comp = torch.where(cmask.bool(), comp, torch.full_like(comp, tok.pad_token_id))
    texts = tok.batch_decode(comp, skip_special_tokens=True)
    return Rollout(ids, mask, comp, cmask, texts)


def cache_kwarg(module) -> str:
    """The keyword a model's forward takes a KV cache by: ``cache`` in transformers 5.2x, ``past_key_values``
    before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@torch.no_grad()
def decode(model, ids: torch.Tensor, mask: torch.Tensor, *, groups: int, max_new_tokens: int, pick, eos_id: int,
           pad_id: int, min_new_tokens: int = 0) -> torch.Tensor:
    """Completions (B * groups, T) of the left-padded prompts ``ids`` (B, P), ``groups`` per prompt (rows
    grouped), T <= max_new_tokens (the step at which the last row ended), pad after each row's EOS.

    1. Prefill: each distinct prompt once, its last-position logits repeated ``groups`` times. Its keys and
       values stay once per prompt (:class:`GroupedPrompt`: each step's attention reads them once for the
       group's rows, then each row's own), or, on a model that cannot (sliding windows, eager attention), are
       repeated to the group's rows.
    2. Decode: step t picks ``pick(logits (n, vocab), t, rows)`` for the n rows still running (``rows``: their
       indices among the B * groups), EOS forbidden while t < ``min_new_tokens``; rows that emit EOS leave the
       batch (their cache rows are dropped), so later steps compute only unfinished rows.

    Positions are the mask's running count (as transformers' generate gives left-padded rows); only the last
    position's logits are computed. The same forward as ``generate`` row by row (the grouped attention up to
    float rounding), so greedy and row-seeded tokens equal those of transformers' ``generate`` on the repeated
    prompts."""
    from lowalign.bundle import position_ids_from_mask

    kw, first = {"use_cache": True}, {}
    key = cache_kwarg(model)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1
        # the prefill's last position as an index, not transformers' slice ``[:, -1:]``: torch's CPU linear on
        # that strided (B, 1, d) view ran 10x slower in float32 and in bfloat16 took 6.6 s and 5 GB for 100
        # prompts (a contiguous copy: 8 ms; benchmarks/RESULTS.md, "bf16 on CPU")
        first["logits_to_keep"] = torch.tensor([ids.shape[1] - 1], device=ids.device)
    grouped = GroupedPrompt.applies(model.config) and groups > 1
    cache = grouped_prompt_cache(model.config, max_new_tokens) if grouped else rollout_cache(model.config,
                                                                                               max_new_tokens)
    pos = position_ids_from_mask(mask)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{**kw, **first},
                   **{key: cache}).logits[:, -1]
    last = pos[:, -1]
    if grouped:
        kw[GROUPED_KWARG] = cache.state.share(groups, mask)
    elif groups > 1:
        cache.batch_repeat_interleave(groups)
    logits, mask, last = (x.repeat_interleave(groups, 0) for x in (logits, mask, last))
    n = mask.shape[0]

    def step(nxt, mask, last):  # one token per running row: (n, vocab) logits
        return model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], **kw,
                     **{key: cache}).logits[:, -1]

    out = torch.full((n, max_new_tokens), pad_id, dtype=ids.dtype, device=ids.device)
    rows = torch.arange(n, device=ids.device)
    steps = 0
    for t in range(max_new_tokens):
        scores = logits.float()
        if t < min_new_tokens:
            scores[:, eos_id] = float("-inf")
        nxt = pick(scores, t, rows)
        out[rows, t] = nxt
        steps = t + 1
        done = nxt == eos_id
        if steps == max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            rows, nxt, mask, last = rows[keep], nxt[keep], mask[keep], last[keep]
            if grouped:
                cache.state.rows = rows
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        last = last + 1
        logits = step(nxt, mask, last)
        if grouped and t == 0 and cache.state.attended < cache.state.updated:
            # some layer's attention never saw the grouped prompt (a decoder that does not pass its keyword
            # arguments down) and attended to the row's own keys only: the step again on whole rows
            cache, grouped = cache.state.whole_rows_cache(cache, model.config, max_new_tokens), False
            del kw[GROUPED_KWARG]
            logits = step(nxt, mask, last)
    return out[:, :steps]


GROUPED_KWARG = "lowalign_grouped"  # the decoder passes it down to every attention call


class GroupedPrompt:
    """A decode batch whose rows share their prompts' keys and values: ``groups`` rows per prompt (rows
    grouped), each prompt's keys once in every layer of :func:`grouped_prompt_cache`, each row's generated ones
    after them. :meth:`attend` is one step's attention (one query per row) over both, cascade style:

        s_p[r] = q[r] K_p[g(r)]^T * scale + bias[g(r)]     the prompt's keys, once per group (B, heads, G R, P)
        s_c[r] = q[r] K_c[r]^T * scale                    the row's own generated keys
        out[r] = softmax([s_p[r], s_c[r]]) [V_p[g(r)]; V_c[r]]

    with the R query heads of each key head side by side, so a group's G rows x R heads are one product
    against the prompt's keys. The prompt's keys are read once per group instead of once per row (the repeat
    of the unshared cache), and never copied to the rows. ``rows`` are the running rows' indices among the
    B * G (finished rows leave the batch); ``bias`` (B, 1, 1, P) is 0 on the prompts' real tokens and -inf on
    their left padding. Scores, softmax and sums run in float32 whatever the model's dtype (in bfloat16, scores
    rounded to 8 bits changed greedy tokens where sdpa's kernel, accumulating in float32, did not)."""

    def __init__(self):
        self.groups, self.rows, self.bias, self.current = 0, None, None, None
        self.updated = self.attended = 0  # layers written and attention calls that read the grouped prompt

    @staticmethod
    def applies(config) -> bool:
        """Whether a model's decode can run grouped: sdpa attention (whose call lowalign routes,
        ``prompt_sharing.packed_attention``) and full attention in every layer."""
        from lowalign.prompt_sharing import _install_packed_attention, packing_mode

        return packing_mode(config) == "block" and _install_packed_attention()

    def share(self, groups: int, prompt_mask: torch.Tensor) -> GroupedPrompt:
        """Called after the prefill of the B distinct prompts (``prompt_mask`` (B, P)): from now on each
        prompt serves ``groups`` rows."""
        self.groups = groups
        self.rows = torch.arange(prompt_mask.shape[0] * groups, device=prompt_mask.device)
        self.bias = torch.zeros(prompt_mask.shape[0], 1, 1, prompt_mask.shape[1], device=prompt_mask.device)
        self.bias.masked_fill_(~prompt_mask.bool()[:, None, None], float("-inf"))
        return self

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """(n, 1, heads, d), sdpa's layout, for ``query`` (n, heads, 1, d) and the running rows' own ``key`` /
        ``value`` (n, kv heads, t, d); the prompts' are the current layer's."""
        layer = self.current
        self.attended += 1
        f32 = torch.float32  # scores and weighted sums in float32 (as sdpa's kernels accumulate) at any dtype
        pk, pv = layer.keys.to(f32), layer.values.to(f32)  # (B, kv heads, P, d)
        key, value = key.to(f32), value.to(f32)
        B, h, P, d = pk.shape
        n, heads, G = query.shape[0], query.shape[1], self.groups
        R = heads // h
        scale = d ** -0.5 if scale is None else scale
        q = query.reshape(n, h, R, d).to(f32)  # query head j * R + i reads key head j
        full = n == B * G
        qa = q if full else q.new_zeros(B * G, h, R, d).index_copy_(0, self.rows, q)
        qa = qa.view(B, G, h, R, d).transpose(1, 2).reshape(B, h, G * R, d)
        sp = torch.matmul(qa, pk.transpose(-1, -2)).mul_(scale).add_(self.bias)  # (B, h, G R, P)
        sp = sp.view(B, h, G, R, P).transpose(1, 2).reshape(B * G, h, R, P)
        if not full:
            sp = sp[self.rows]
        sc = torch.matmul(q, key.transpose(-1, -2)).mul_(scale)  # (n, h, R, t)
        p = torch.softmax(torch.cat([sp, sc], -1), -1)
        pp = p[..., :P]
        if not full:
            pp = pp.new_zeros(B * G, h, R, P).index_copy_(0, self.rows, pp)
        op = torch.matmul(pp.reshape(B, G, h, R, P).transpose(1, 2).reshape(B, h, G * R, P), pv)
        op = op.view(B, h, G, R, d).transpose(1, 2).reshape(B * G, h, R, d)
        if not full:
            op = op[self.rows]
        out = op + torch.matmul(p[..., P:], value)  # (n, h, R, d)
        return out.reshape(n, heads, 1, d).transpose(1, 2).to(query.dtype).contiguous()

    def whole_rows(self, key: torch.Tensor, value: torch.Tensor) -> tuple:
        """The running rows' whole keys and values (n, kv heads, P + t, d), each row's prompt copied in front of
        its own, and their (n, 1, 1, P + t) boolean mask: what the unshared cache holds, for an attention call
        :meth:`attend` does not cover."""
        layer, g = self.current, self.rows // self.groups
        self.attended += 1
        n, t = key.shape[0], key.shape[-2]
        keep = torch.cat([self.bias[g] == 0, torch.ones(n, 1, 1, t, dtype=torch.bool, device=key.device)], -1)
        return torch.cat([layer.keys[g], key], 2), torch.cat([layer.values[g], value], 2), keep

    def whole_rows_cache(self, cache, config, room: int):
        """A :func:`rollout_cache` holding each running row's prompt keys and values (its group's, copied), none
        of the steps since the prefill: for a decoder that cannot decode grouped, from its first step on."""
        whole, g = rollout_cache(config, room), self.rows // self.groups
        for i, layer in enumerate(cache.layers):
            whole.layers[i].update(layer.keys[g], layer.values[g])
        return whole


@functools.cache
def _in_place_layer_class():
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        """A KV cache layer that writes each step into a buffer with room for ``room`` more tokens, where
        transformers' ``DynamicLayer`` concatenates a new (rows, heads, length + 1, dim) tensor per layer and
        step: a copy of the whole cache every step, and on a CPU whose heap was just handed back to the OS
        (between a step's phases) fresh pages for every copy. ``keys``/``values`` are views of the first
        ``length`` positions (attention reads them in place); the same values as ``DynamicLayer``'s."""

        def __init__(self, room: int):
            super().__init__()
            self.room, self.length = room, 0
            self.k_buf = self.v_buf = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._write(key_states, value_states)
            self._views()
            return self.keys, self.values

        def _write(self, key_states, value_states) -> tuple:
            """Append to the buffers (made, or grown by ``room``, when full); the first ``length`` positions."""
            n = key_states.shape[-2]
            if self.k_buf is None or self.length + n > self.k_buf.shape[-2]:  # first call (or out of room)
                cap = self.length + n + self.room
                k_buf = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[-1])
                v_buf = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[-1])
                if self.length:
                    k_buf[:, :, :self.length] = self.k_buf[:, :, :self.length]
                    v_buf[:, :, :self.length] = self.v_buf[:, :, :self.length]
                self.k_buf, self.v_buf = k_buf, v_buf
            self.k_buf[:, :, self.length:self.length + n] = key_states
            self.v_buf[:, :, self.length:self.length + n] = value_states
            self.length += n
            return self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]

        def _views(self) -> None:
            self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]

        def get_seq_length(self) -> int:
            return self.length

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.length:
                self.k_buf = self.k_buf.repeat_interleave(repeats, 0)
                self.v_buf = self.v_buf.repeat_interleave(repeats, 0)
                self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.length:
                self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("the rollout cache is never cropped")

        def reset(self) -> None:
            self.k_buf = self.v_buf = None
            self.length = 0
            super().reset()

    return InPlaceLayer


def rollout_cache(config, room: int):
    """transformers' ``DynamicCache`` for ``config`` with its full-attention layers written in place, each
    with ``room`` tokens to spare after the prompt (sliding-window layers keep their own)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache, layer = DynamicCache(config=config), _in_place_layer_class()
    cache.layers = [layer(room) if type(x) is DynamicLayer else x for x in cache.layers]
    return cache


@functools.cache
def _grouped_prompt_layer_class():
    InPlaceLayer = _in_place_layer_class()

    class GroupedPromptLayer(InPlaceLayer):
        """A rollout cache layer of :class:`GroupedPrompt`: the prefill's keys and values (one row per
        distinct prompt) stay as they are; once the state is shared, each step's keys and values are written
        in place per row (:class:`InPlaceLayer`'s buffer) and only those are returned, the attention reading
        the prompt's from here."""

        def __init__(self, room: int, state: GroupedPrompt):
            super().__init__(room)
            self.state = state

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.state.groups:  # the prefill
                return super(InPlaceLayer, self).update(key_states, value_states, *args, **kwargs)
            self.state.current = self
            self.state.updated += 1
            return self._write(key_states, value_states)  # the rows' own keys, in place

        def get_seq_length(self) -> int:
            return (self.keys.shape[-2] if self.is_initialized else 0) + self.length

        def _views(self) -> None:  # the rows' buffers are not the layer's keys: those stay the prompts'
            pass

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("a grouped prompt is never repeated to its rows")

    return GroupedPromptLayer


def grouped_prompt_cache(config, room: int):
    """A ``DynamicCache`` for ``config`` (full attention in every layer) whose layers keep each prompt's keys
    once and each row's generated ones in place (``room`` tokens reserved); ``cache.state`` is its
    :class:`GroupedPrompt`, passed to the decoder as ``GROUPED_KWARG`` once shared."""
    from transformers import DynamicCache

    cache, state = DynamicCache(config=config), GroupedPrompt()
    cache.layers = [_grouped_prompt_layer_class()(room, state) for _ in cache.layers]
    cache.state = state
    return cache


@functools.cache
def _shared_prompt_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SharedPromptLayer(DynamicLayer):
        """A KV cache layer that keeps one prompt's keys and values per group of ``groups`` rows: the first
        ``update`` (the distinct prompts' forward) stores them; once :meth:`share` is called, each later
        ``update`` (every row's continuation, all its tokens at once) returns the group's prompt states
        repeated to its rows followed by the new ones, and stores nothing, so the cache never holds more
        than the distinct prompts."""

        groups = 0

        def share(self, groups: int) -> None:
            self.groups = groups

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.groups:
                return super().update(key_states, value_states, *args, **kwargs)
            return (torch.cat([self.keys.repeat_interleave(self.groups, 0), key_states], -2),
                    torch.cat([self.values.repeat_interleave(self.groups, 0), value_states], -2))

    return SharedPromptLayer


def shared_prompt_cache(config):
    """A ``DynamicCache`` for ``config`` whose layers serve a group's prompt to its rows
    (``_shared_prompt_layer_class``); None when the model has a layer of another kind (sliding windows), which
    then scores every row whole."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    if any(type(x) is not DynamicLayer for x in cache.layers):
        return None
    cache.layers = [_shared_prompt_layer_class()() for _ in cache.layers]
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
