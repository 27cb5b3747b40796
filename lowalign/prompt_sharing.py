"""The backbone over rollout rows that share a prompt, the prompt computed once per run of rows.

A GRPO-family rollout holds G completions per prompt, rows grouped, and a chat prompt is often longer than its
completion (SmolLM2's arithmetic prompts: 47 tokens, completions 16). Every path here returns what
``ModelBundle.hidden_states`` returns on the whole rows, (B, P + C, d), up to float rounding: a prompt position
attends only to earlier prompt positions, so its states do not depend on the completion that follows.

* :func:`cached_prompt_hidden_states` (no gradient): each distinct prompt's forward once with a KV cache, then
  every row's completion on its run's cached prompt (the cache never holds more than the distinct prompts).
* :func:`packed_prompt_hidden_states` (training): one packed sequence per run, ``prompt, completion 1, ...,
  completion g``, with a block mask (each completion attends to the prompt and to itself, causally) and each
  completion's positions continuing its prompt's. One ordinary forward, so gradient checkpointing applies as
  usual; the prompt's gradient is the sum over its run's completions, as it is on whole rows. Under sdpa the
  attention runs block by block (:func:`packed_attention`): the prompt's queries on the prompt, each
  completion's on the prompt and itself, so the packed row's attention costs what the whole rows' costs and
  packing pays at any completion length.
* :func:`completion_hidden_states` picks one, or the whole rows when sharing does not pay or does not apply
  (prompts repeated unequally, sliding-window attention, an attention kernel without custom masks). Rows of
  one prompt need not be adjacent (:func:`prompt_groups`: DPO's chosen and rejected halves).
"""

from __future__ import annotations

import dataclasses

import torch


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(order, g) when the rows hold each of their distinct prompts (padding included) exactly g > 1 times:
    ``order`` a permutation putting each prompt's rows together (None when they already are: a rollout's
    groups), else (None, 1). DPO's batches hold each prompt twice, chosen rows then rejected rows."""
    B = prompt_ids.shape[0]
    _, inverse, counts = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True,
                                      return_counts=True)
    g = int(counts[0])
    if g == 1 or bool((counts != g).any()):
        return None, 1
    order = torch.argsort(inverse, stable=True)
    contiguous = bool((inverse.view(B // g, g) == inverse[::g, None]).all())
    return (None if contiguous else order), g


def _sliding(config) -> bool:
    return getattr(config.get_text_config(), "sliding_window", None) is not None


def cached_prompt_hidden_states(bundle, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                groups: int) -> torch.Tensor | None:
    """No-gradient backbone output (B, P + C, d) of rows in runs of ``groups`` per prompt, in the bundle's
    current role: each distinct prompt's forward once, then every row's completion on its run's cached prompt,
    at P / (P + C) * (1 - 1/groups) less compute. None when the model's cache has sliding-window layers."""
    from lowalign.bundle import position_ids_from_mask
    from lowalign.generation import cache_kwarg, shared_prompt_cache

    cache = shared_prompt_cache(bundle.base.config)
    if cache is None:
        return None
    decoder = bundle.base.get_decoder()
    key, P = cache_kwarg(decoder), prompt_ids.shape[1]
    mask = torch.cat([prompt_mask, completion_mask], 1)
    pos = position_ids_from_mask(mask)
    prompt = decoder(input_ids=prompt_ids[::groups], attention_mask=prompt_mask[::groups],
                     position_ids=pos[::groups, :P], use_cache=True, **{key: cache}).last_hidden_state
    for layer in cache.layers:
        layer.share(groups)
    rest = decoder(input_ids=completion_ids, attention_mask=mask, position_ids=pos[:, P:], use_cache=True,
                   **{key: cache}).last_hidden_state
    return torch.cat([prompt.repeat_interleave(groups, 0), rest], 1)


def packed_mask(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, L, L) bool, True where packed query q may attend to key k, for n = B / groups packed rows of length
    L = P + groups * C: k <= q, k in the prompt or in q's own completion, k not padding. A padding query sees
    itself only (a row of the mask is never empty; its output is never read)."""
    B, P = prompt_mask.shape
    C = completion_mask.shape[1]
    n, L = B // groups, P + groups * C
    dev = prompt_mask.device
    block = torch.cat([torch.full((P,), -1, device=dev), torch.arange(groups, device=dev).repeat_interleave(C)])
    idx = torch.arange(L, device=dev)
    visible = (idx[None, :] <= idx[:, None]) & ((block[None, :] == block[:, None]) | (block[None, :] == -1))
    keys = torch.cat([prompt_mask[::groups], completion_mask.reshape(n, groups * C)], 1).bool()  # (n, L)
    return (visible[None] & keys[:, None, :]) | torch.eye(L, dtype=torch.bool, device=dev)[None]


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where a packed row's blocks are, for :func:`packed_attention`: ``prompt_len`` P, ``groups`` g completions
    of ``completion_len`` C each; the prompt's (n, 1, P, P) and the completions' (n g, 1, C, P + C) boolean
    masks (True: may attend), both restrictions of :func:`packed_mask`."""

    prompt_len: int
    groups: int
    completion_len: int
    prompt_mask: torch.Tensor
    completion_mask: torch.Tensor


LAYOUT_KWARG = "lowalign_packed"  # the decoder passes it down to every attention call (and the recompute's)


def block_masks(allowed: torch.Tensor, prompt_len: int, completion_len: int, groups: int) -> PackedLayout:
    """:func:`packed_mask`'s (n, L, L) ``allowed`` cut into its non-empty blocks: the prompt on itself, and each
    completion on [prompt, itself]. Nothing else is visible in a packed row, so the blocks are all of it."""
    P, C = prompt_len, completion_len
    rows = allowed[:, P:].unflatten(1, (groups, C))  # (n, g, C, L): each completion's queries
    own = torch.stack([rows[:, j, :, P + j * C:P + (j + 1) * C] for j in range(groups)], 1)  # (n, g, C, C)
    completion = torch.cat([rows[..., :P], own], -1).flatten(0, 1)  # (n g, C, P + C)
    return PackedLayout(P, groups, C, allowed[:, None, :P, :P], completion[:, None])


def packed_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' sdpa attention, block by block when the call carries a :class:`PackedLayout` (else sdpa
    itself). On a packed row [prompt (P), completion 1 (C), ..., completion g] with query/key/value (n, heads,
    P + g C, head_dim), the dense block mask would make the row's attention cost (P + g C)^2 query-key pairs;
    here it is

        out[prompt]       = sdpa(q[prompt], k[prompt], v[prompt], causal on the prompt)
        out[completion j] = sdpa(q[j], [k[prompt]; k[j]], [v[prompt]; v[j]], all of the prompt + causal on j)

    P^2 + g C (P + C) pairs, as on whole rows (where the prompt repeats g times). The prompt's keys and values
    are expanded to the g completions, so their gradients are the sums over them. Returns sdpa's
    ((n, P + g C, heads, head_dim), None)."""
    from lowalign.generation import GROUPED_KWARG

    grouped = kwargs.pop(GROUPED_KWARG, None)
    if grouped is not None:  # a decode step of grouped rows (lowalign.generation.decode)
        plain = query.shape[2] == 1 and not any(kwargs.get(k) is not None for k in _OTHER_SCORES)
        if plain:
            return grouped.attend(query, key, value, kwargs.get("scaling")), None
        key, value, attention_mask = grouped.whole_rows(key, value)  # anything else: sdpa on whole rows
    layout = kwargs.pop(LAYOUT_KWARG, None)
    if layout is None:
        return _SDPA(module, query, key, value, attention_mask, *args, **kwargs)
    P, g, C = layout.prompt_len, layout.groups, layout.completion_len
    n, h, d = query.shape[0], key.shape[1], key.shape[-1]
    out_p, _ = _SDPA(module, query[:, :, :P], key[:, :, :P], value[:, :, :P], layout.prompt_mask, *args, **kwargs)

    def per_completion(x):  # (n, heads, P + g C, d) -> (n g, heads, C, d)
        return x[:, :, P:].unflatten(2, (g, C)).transpose(1, 2).flatten(0, 1)

    def with_prompt(x):  # keys / values: [prompt; completion j] for every completion, (n g, kv heads, P + C, d)
        prompt = x[:, None, :, :P].expand(n, g, h, P, d).flatten(0, 1)
        return torch.cat([prompt, per_completion(x)], 2)

    out_c, _ = _SDPA(module, per_completion(query), with_prompt(key), with_prompt(value), layout.completion_mask,
                     *args, **kwargs)  # (n g, C, heads, d)
    return torch.cat([out_p, out_c.unflatten(0, (n, g)).flatten(1, 2)], 1), None


_SDPA = None
_OTHER_SCORES = ("softcap", "sliding_window", "s_aux", "head_mask", "position_bias")  # not plain softmax(q k^T)


def _install_packed_attention() -> bool:
    """Register :func:`packed_attention` as transformers' "sdpa" (once per process). Without the layout it is
    sdpa unchanged, so every other model and call is unaffected; with it, the packed rows' blocks."""
    global _SDPA
    if _SDPA is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        current = ALL_ATTENTION_FUNCTIONS.get("sdpa")
        if current is None:
            return False
        _SDPA = current
        ALL_ATTENTION_FUNCTIONS.register("sdpa", packed_attention)
    return True


def packing_mode(config) -> str | None:
    """How the packed training forward runs on a model: "block" (sdpa: :func:`packed_attention`), "dense"
    (eager: the additive block mask), None (not at all: sliding-window attention, or an attention kernel that
    takes no custom mask)."""
    if _sliding(config):
        return None
    return {"sdpa": "block", "eager": "dense"}.get(getattr(config, "_attn_implementation", None))


def packed_prompt_hidden_states(bundle, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                groups: int) -> torch.Tensor | None:
    """Backbone output (B, P + C, d) of rows in runs of ``groups`` per prompt, gradients included, from one
    packed sequence per run (:func:`packed_mask`); positions as on the whole rows (the completion's continue
    its prompt's count of real tokens). None when the attention kernel takes no custom mask (sdpa and eager
    do) or the model has sliding-window attention."""
    from lowalign.bundle import position_ids_from_mask

    mode = packing_mode(bundle.base.config)
    if mode is None:
        return None
    B, P = prompt_ids.shape
    C = completion_ids.shape[1]
    n = B // groups
    pos = position_ids_from_mask(torch.cat([prompt_mask, completion_mask], 1))
    ids = torch.cat([prompt_ids[::groups], completion_ids.reshape(n, groups * C)], 1)
    packed_pos = torch.cat([pos[::groups, :P], pos[:, P:].reshape(n, groups * C)], 1)
    allowed = packed_mask(prompt_mask, completion_mask, groups)  # (n, L, L)
    extra = {}
    if mode == "block" and _install_packed_attention():  # the dense mask stays the meaning for any layer without
        extra[LAYOUT_KWARG] = block_masks(allowed, P, C, groups)  # the layout
    allowed = allowed[:, None]  # (n, 1, L, L)
    if mode == "dense":  # eager: an additive mask
        dtype = bundle.base.get_input_embeddings().weight.dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=ids.device).masked_fill_(~allowed,
                                                                                        torch.finfo(dtype).min)
    h = bundle.base.get_decoder()(input_ids=ids, attention_mask=allowed, position_ids=packed_pos,
                                  use_cache=False, **extra).last_hidden_state  # (n, L, d)
    return torch.cat([h[:, :P].repeat_interleave(groups, 0), h[:, P:].reshape(B, C, h.shape[-1])], 1)


def packing_pays(config, B: int, P: int, C: int, groups: int, margin: float | None = None) -> bool:
    """Whether the model packs (:func:`packing_mode`) and the packed forward's estimated FLOPs are under
    ``margin`` x the whole rows' (:func:`packed_cost` with ``config``'s sizes)."""
    from lowalign.models import text_sizes

    d, attn, kv, inter, _ = text_sizes(config)
    mode = packing_mode(config)
    cost = packed_cost(d, attn, kv, inter, B, P, C, groups, block=mode == "block")
    return mode is not None and cost < (PACKING_MARGIN if margin is None else margin)


def packed_cost(hidden: int, attn: int, kv: int, intermediate: int, B: int, P: int, C: int, groups: int,
                block: bool = True) -> float:
    """The packed forward's FLOPs over the whole rows' (estimates): linear layers (per token, ~2 x a layer's
    weights) fall by (B - B / groups) * P tokens. Attention (per query-key pair, ~4 x the query width) goes
    from B (P + C)^2 pairs to B / groups (P^2 + groups C (P + C)) block by block (``block``: sdpa), or to
    B / groups (P + groups C)^2 on the dense mask (eager), where long completions make the packed row's
    attention cost more than the prompt saves."""
    per_token = 2 * (2 * hidden * attn + 2 * hidden * kv + 3 * hidden * intermediate)
    per_pair = 4 * attn
    n, L = B // groups, P + groups * C
    pairs = n * (P * P + groups * C * (P + C)) if block else n * L ** 2
    whole = B * (P + C) * per_token + B * (P + C) ** 2 * per_pair
    return (n * L * per_token + pairs * per_pair) / whole


PACKING_MARGIN = 0.8


def completion_hidden_states(bundle, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Backbone output (B, P + C, d) of rollout rows in the bundle's current role, each run of identical
    prompts computed once where that applies: the cached path without gradients, the packed one (when
    :func:`packing_pays`) with them, else the whole rows (always inside ``ModelBundle.row_scales``, where each
    row is its own adapter variant)."""
    order, g = (None, 1) if bundle.rows_pinned else prompt_groups(prompt_ids, prompt_mask)  # per-row adapters
    parts = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    h = None
    if g > 1:
        grouped = parts if order is None else tuple(x[order] for x in parts)
        if not torch.is_grad_enabled():
            h = cached_prompt_hidden_states(bundle, *grouped, g)
        elif packing_pays(bundle.base.config, *prompt_ids.shape, completion_ids.shape[1], g):
            h = packed_prompt_hidden_states(bundle, *grouped, g)
        if h is not None and order is not None:
            h = h[torch.argsort(order)]
    if h is None:
        h = bundle.hidden_states(torch.cat([prompt_ids, completion_ids], 1),
                                 torch.cat([prompt_mask, completion_mask], 1))
    return h
