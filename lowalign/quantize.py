"""GPTQ onto bitsandbytes' nf4 grid: 4-bit weights calibrated on the run's own prompts.

bitsandbytes quantizes each block of 64 weights by rounding ``w / absmax`` to the nearest of 16 nf4 levels
(round to nearest, RTN). That ignores which directions of a layer's input matter. GPTQ (Frantar et al. 2022,
arXiv 2210.17323) quantizes a linear's input columns one at a time and spreads each column's rounding error
over the columns not yet quantized, through the inverse of the layer's input Hessian ``H = X^T X``, so that
the layer's *output* on the calibration inputs moves as little as possible. The result is stored in
bitsandbytes' own format (packed codes plus each block's absmax), so the 4-bit kernels, LoRA and export run
unchanged. Measured on SmolLM2-135M-Instruct (a Q4_1 GGUF re-quantized to nf4), KL from the float32 model per
token over 200 held-out chat problems and their answers: round to nearest 1.12 nats, GPTQ in input order
0.04-0.05, GPTQ in act-order 0.011-0.018 (three calibration samples of 256 prompts;
``benchmarks/nf4_error.py``, ``benchmarks/RESULTS.md``).

Layer by layer (:func:`calibrate_nf4`): the calibration hidden states run through the decoder layers in order,
each layer's linears are quantized from its inputs (already through the calibrated layers before it), and the
layer's outputs, with its new weights, feed the next. Only one layer's full-precision weights are read at a
time (from the source's safetensors), so a model that only fits in 4-bit can be calibrated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def nf4_levels(device=None) -> torch.Tensor:
    """bitsandbytes' 16 nf4 levels in [-1, 1], in code order (code i dequantizes to ``levels[i] * absmax``)."""
    import bitsandbytes.functional as F

    return F.get_4bit_type("nf4", device="cpu").to(device)


def nearest_code(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest nf4 level of each entry of ``x`` (already divided by its block's absmax)."""
    return (x.unsqueeze(-1) - levels).abs().argmin(-1)


def gptq_nf4(w: torch.Tensor, h: torch.Tensor, blocksize: int = 64, damp: float = 0.01,
             absmax: torch.Tensor | None = None, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one linear onto the nf4 grid.

    ``w``: [out, in] full-precision weight; ``h``: [in, in] sum of ``x x^T`` over calibration inputs x.
    Returns ``codes`` [out, in] (uint8, 0..15) and ``absmax`` [out, in / blocksize] (float32): weight
    ``(o, j)`` dequantizes to ``levels[codes[o, j]] * absmax[o, j // blocksize]``, bitsandbytes' layout for a
    row-major weight whose rows are whole blocks.

    With ``U`` the upper Cholesky factor of ``(H + lambda I)^-1`` (lambda = ``damp`` x mean diagonal), column
    ``j`` is rounded to ``q_j``, and the columns after it absorb its error::

        w_k <- w_k - (w_j - q_j) U[j, k] / U[j, j]        for k after j

    (the closed-form optimal update of the remaining weights for the layer's squared output error; the paper's
    Eq. 3 in Cholesky form). Each block's absmax is taken when the block's first column is reached, from the
    weights as updated so far, unless ``absmax`` [out, in / blocksize] fixes the scales beforehand (then a
    weight pushed past its block's absmax takes the outermost level). ``act_order`` (fixed scales only) takes
    the columns in order of decreasing ``H[j, j]`` instead of input order: the inputs with the most energy are
    rounded first, while the most columns are left to absorb their error (the paper's "act-order"; fixed
    scales keep bitsandbytes' contiguous blocks valid in any order). With ``h`` diagonal no error moves, and the
    codes are bitsandbytes' own rounding.
    """
    out, n = w.shape
    if n % blocksize:
        raise ValueError(f"gptq_nf4: {n} input columns are not whole blocks of {blocksize}")
    if act_order and absmax is None:
        raise ValueError("gptq_nf4: act_order needs fixed absmax (a block's columns are no longer contiguous)")
    levels = nf4_levels(w.device).double()
    w = w.double().clone()
    diag = h.diagonal().double().clone()
    dead = diag == 0  # inputs that were always zero: their weights cannot matter
    diag[dead] = 1.0
    w[:, dead] = 0.0
    fixed = absmax is not None
    absmax = (absmax.to(w.device, torch.float64) if fixed
              else torch.empty(out, n // blocksize, dtype=torch.float64, device=w.device))
    scales = absmax.repeat_interleave(blocksize, 1)  # [out, in]: each column's block scale
    order = (torch.argsort(diag, descending=True, stable=True) if act_order
             else torch.arange(n, device=w.device))
    # H permuted into a matrix of its own (``h`` is left as it was); then each factor replaces the one before,
    # so at most three [in, in] float64 matrices live at once with ``h`` (down_proj's are intermediate^2 x 8 B)
    w, scales = w[:, order], scales[:, order]
    u = h.double()[order][:, order]
    u.diagonal().copy_(diag[order])  # dead inputs get 1 (their rows and columns are 0)
    u.diagonal().add_(damp * u.diagonal().mean())
    u = torch.linalg.cholesky(u)
    u = torch.cholesky_inverse(u)
    u = torch.linalg.cholesky(u, upper=True)
    codes = torch.empty(out, n, dtype=torch.uint8, device=w.device)
    tiny = torch.finfo(torch.float32).tiny
    for b0 in range(0, n, blocksize):  # 64 columns at a time; the later ones get their error in one matmul
        b1 = b0 + blocksize
        if not fixed:  # input order: these 64 columns are one block
            absmax[:, b0 // blocksize] = w[:, b0:b1].abs().amax(1)
            scales[:, b0:b1] = absmax[:, b0 // blocksize, None]
        err = torch.empty(out, blocksize, dtype=w.dtype, device=w.device)
        for j in range(b0, b1):
            scale = scales[:, j].clamp_min(tiny)
            c = nearest_code(w[:, j] / scale, levels)
            codes[:, j] = c.to(torch.uint8)
            e = (w[:, j] - levels[c] * scale) / u[j, j]
            w[:, j + 1:b1] -= e[:, None] * u[j, j + 1:b1][None]
            err[:, j - b0] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, order] = codes
    return unpermuted, absmax.float()


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` (any shape, 0..15) as bitsandbytes packs them: two per byte, the even-indexed in the high
    nibble, flattened row-major, shaped [numel / 2, 1]."""
    flat = codes.reshape(-1).to(torch.uint8)
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def nf4_state(layer: nn.Module, absmax: torch.Tensor):
    """bitsandbytes' quantization state for ``Linear4bit`` ``layer`` with per-block ``absmax``, as bitsandbytes
    stores them (double-quantized when the layer's are), and the absmax the 4-bit kernels will then use."""
    import bitsandbytes.functional as F

    old = layer.weight.quant_state
    if absmax.numel() != old.absmax.numel():
        raise ValueError(f"nf4_state: {absmax.numel()} blocks do not fit a {layer.out_features} x "
                         f"{layer.in_features} layer in blocks of {old.blocksize}")
    # a carrier whose blocks' absmax are ours: bitsandbytes then builds the (nested) state for exactly them,
    # and dequantizing it gives each block's first weight = the absmax the kernels use
    device = layer.weight.data.device
    carrier = torch.zeros(layer.out_features * layer.in_features, dtype=old.dtype, device=device)
    carrier[::old.blocksize] = absmax.reshape(-1).to(device, old.dtype)
    carrier = carrier.reshape(layer.out_features, layer.in_features)
    q, state = F.quantize_4bit(carrier, blocksize=old.blocksize, compress_statistics=old.nested,
                               quant_type=old.quant_type, quant_storage=layer.weight.data.dtype)
    used = F.dequantize_4bit(q, state).reshape(-1, old.blocksize)[:, 0].float()
    return state, used.reshape(absmax.shape)


def set_nf4_weight(layer: nn.Module, packed: torch.Tensor, absmax: torch.Tensor, state=None) -> None:
    """Write ``packed`` codes (:func:`pack_nf4`) and per-block ``absmax`` into bitsandbytes' ``Linear4bit``
    ``layer`` in its own format (``state``: :func:`nf4_state` of ``absmax``, built here when not given)."""
    if packed.numel() * 2 != layer.out_features * layer.in_features:
        raise ValueError(f"set_nf4_weight: {packed.numel() * 2} codes do not fit a {layer.out_features} x "
                         f"{layer.in_features} layer")
    if state is None:
        state, _ = nf4_state(layer, absmax)
    layer.weight.data = packed.reshape(layer.weight.data.shape).to(layer.weight.data.device,
                                                                    layer.weight.data.dtype)
    layer.weight.quant_state = state


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with ``config.num_hidden_layers`` entries."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ValueError(f"no list of {n} decoder layers found in {type(model).__name__}")


class _Caught(Exception):
    pass


def _hidden(call: tuple) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: tuple, hidden: torch.Tensor | None) -> tuple:
    """A recorded layer call with ``hidden`` as its hidden states."""
    args, kwargs = call
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def _hessians(layer: nn.Module, quant: dict, caught: list) -> dict:
    """``{name: X^T X}`` of the inputs of each of ``layer``'s modules ``quant`` over the caught batches, the
    real (unpadded) tokens only."""
    hs = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
          for n, m in quant.items()}
    mask = None

    def accumulate(args, n):
        x = args[0][mask].double()  # [tokens, in]
        hs[n].addmm_(x.T, x)

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: accumulate(args, n)) for n, m in quant.items()]
    try:
        for (args, kwargs), mask in caught:  # noqa: B007 (accumulate reads this batch's mask)
            layer(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return hs


@torch.no_grad()
def calibrate_nf4(model: nn.Module, batches: Iterable[dict], read_weight: Callable[[str], torch.Tensor | None],
                  progress: Callable[[Iterable], Iterable] = iter, damp: float = 0.01, act_order: bool = False
                  ) -> dict:
    """GPTQ every bitsandbytes 4-bit linear inside the decoder layers of ``model``, layer by layer.

    ``batches``: tokenized calibration inputs (``input_ids``, ``attention_mask``); ``read_weight(name)``: the
    full-precision tensor ``name`` (``<module>.weight``, the module named as in ``model``; None: leave that
    module as it is). Linears whose rows are not whole quantization blocks keep bitsandbytes' rounding.
    Padding positions do not enter the Hessians. Returns ``{module name: (packed codes, absmax)}`` of what was
    written (:func:`set_nf4_weight` puts them back).
    """
    import bitsandbytes as bnb

    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    # each layer's call as the model makes it, per batch: its keyword arguments can differ by layer (Gemma 3's
    # sliding-window layers get other masks and rotary tables than its global ones); the forward stops before
    # the head (no [tokens, vocabulary] logits)
    calls: list[list] = []  # [batch][layer] -> (args, kwargs); layer 0's args hold the embeddings

    def record(mod, args, kwargs, i):  # later layers' hidden states are not kept: they get the calibrated ones
        calls[-1].append((args, kwargs) if i == 0 else _with_hidden((args, kwargs), None))
        if i == len(layers) - 1:
            raise _Caught

    hooks = [layer.register_forward_pre_hook(lambda mod, args, kwargs, i=i: record(mod, args, kwargs, i),
                                             with_kwargs=True) for i, layer in enumerate(layers)]
    masks = []
    try:
        for batch in batches:
            calls.append([])
            masks.append(batch["attention_mask"].bool())
            try:
                model(**batch, use_cache=False)
            except _Caught:
                pass
    finally:
        for h in hooks:
            h.remove()
    hidden = [_hidden(c[0]) for c in calls]
    written = {}
    for i in progress(range(len(layers))):
        layer = layers[i]
        caught = [(_with_hidden(c[i], h), m) for c, h, m in zip(calls, hidden, masks)]
        quant = {n: m for n, m in layer.named_modules() if isinstance(m, bnb.nn.Linear4bit)
                 and m.in_features % m.weight.quant_state.blocksize == 0}  # rows of whole blocks only
        hs = _hessians(layer, quant, caught)
        for n, m in quant.items():
            full = f"{prefix}.{i}.{n}"
            w = read_weight(f"{full}.weight")
            if w is None or tuple(w.shape) != (m.out_features, m.in_features):
                continue
            bs = m.weight.quant_state.blocksize
            w = w.to(hs[n].device)
            absmax = w.reshape(w.shape[0], -1, bs).abs().amax(-1)  # fixed from the start: the scales the
            state, used = nf4_state(m, absmax)                      # kernels will use (double-quantized)
            codes, _ = gptq_nf4(w, hs.pop(n), bs, damp, absmax=used, act_order=act_order)  # each H freed after use
            written[full] = (pack_nf4(codes), absmax)
            set_nf4_weight(m, *written[full], state=state)
        for k, ((args, kwargs), _) in enumerate(caught):  # the calibrated layer's outputs feed the next
            out = layer(*args, **kwargs)
            hidden[k] = out[0] if isinstance(out, tuple) else out
    return written
