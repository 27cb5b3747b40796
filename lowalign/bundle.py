"""ModelBundle: one base model, many roles.

The base (optionally bitsandbytes 4-bit/8-bit) is loaded once. Roles:

* ``"reference"``: the base with every adapter disabled, or (``set_reference_adapter``) a frozen copy
  of the policy's starting adapter on the same base;
* ``"<adapter>"`` (``"policy"``, ``"reward"``, ``"value"``, ...): that LoRA adapter active.

Scalar heads (reward/value) are small ``nn.Linear`` modules reading the backbone's last hidden state.
This is the only module in lowalign that touches PEFT or bitsandbytes internals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowalign.config import ConfigError, LoraConfig, ModelConfig
from lowalign.models import load_tokenizer, resolve_path, resolve_target_modules
from lowalign.runtime import atomic_write, replace_dir

REFERENCE = "reference"
INIT_REFERENCE = "init_reference"  # the adapter behind the reference role when `reference: init`


def check_unsloth_available() -> None:
    """Config-time check for ``model.backend: unsloth`` (GPU only)."""
    if not torch.cuda.is_available():
        raise ConfigError("model.backend: 'unsloth' needs a CUDA GPU and none is visible; use backend: hf")
    try:
        import unsloth  # noqa: F401
    except ImportError as e:
        raise ConfigError("model.backend: 'unsloth' is not installed (pip install 'lowalign[unsloth]')") from e


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: '{name}' requested but no CUDA GPU is visible")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "hidden_dropout", "resid_dropout",
                  "activation_dropout", "embd_pdrop", "attn_pdrop", "resid_pdrop", "summary_first_dropout")


def disable_dropout(model: nn.Module) -> int:
    """Dropout off everywhere in ``model``: every ``nn.Dropout`` gets p = 0, and float dropout rates that
    attention code reads from its module or the config (Llama's ``attention_dropout``, ...) become 0.
    Returns how many were changed."""
    n = 0
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    for obj in [*model.modules(), *configs]:
        if isinstance(obj, nn.Dropout) and obj.p:
            obj.p, n = 0.0, n + 1
        for attr in _DROPOUT_ATTRS:
            if isinstance(getattr(obj, attr, None), float) and getattr(obj, attr):
                setattr(obj, attr, 0.0)
                n += 1
    return n


def freeze_quantized_base(model: nn.Module) -> None:
    """Freeze every base parameter of a 4-/8-bit model and leave the rest in the compute dtype.

    This is peft's ``prepare_model_for_kbit_training`` without its cast of every unquantized parameter to
    fp32. That cast made the embeddings (and a tied lm_head) fp32: 890 instead of 445 MiB for
    Qwen2.5-1.5B, a residual stream carried in fp32 through every layer (embedding + bf16 = fp32), and the
    log-prob kernels run on fp32 hidden states and head (benchmarks/RESULTS.md, GPU section: nf4 GRPO
    above bf16's peak, its train phase 5x bf16's). Norms compute their statistics in fp32 inside the
    layer whatever their weight's dtype; the frozen embeddings gain nothing from fp32. Gradient
    checkpointing's input hook is set by ``ModelBundle.load`` for every base."""
    for p in model.parameters():
        p.requires_grad_(False)


def guard_avx512bf16(model: nn.Module) -> int:
    """bitsandbytes' CPU path repacks a Linear4bit weight in place when it runs under eval()/no_grad on
    CPUs with AVX512-BF16; later backward passes then silently lose LoRA gradients. Turn that off on
    every Linear4bit. Returns how many layers were guarded."""
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _check_rows(s: torch.Tensor, rows: int, mod_name: str) -> None:
    if rows != s.shape[0]:
        raise ValueError(f"row_scales: {s.shape[0]} rows of scales for {mod_name}, but the batch has {rows} rows")


def _row_view(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(rows, r) scales shaped to multiply a (rows, ..., r) tensor."""
    return s.to(like.device, like.dtype).view(s.shape[0], *([1] * (like.ndim - 2)), s.shape[1])


def _scale_rows_hook(s: torch.Tensor, mod_name: str):
    """Forward hook on ``lora_A``: its (rows, ..., r) output times each row's scales."""
    def scale_rows(_mod, _inp, out):
        _check_rows(s, out.shape[0], mod_name)
        return out * _row_view(s, out)
    return scale_rows


def _only_live_adapter(m: nn.Module, name: str) -> bool:
    """Whether adapter ``name`` is, right now, the only one peft LoRA module ``m`` adds (unmerged, enabled)."""
    return (not getattr(m, "merged", True) and not getattr(m, "disable_adapters", True)
            and list(m.active_adapters) == [name])


def _plain_lora(m: nn.Module, name: str) -> bool:
    """Whether peft LoRA module ``m`` computes exactly ``base(x) + scaling * B(A(x))`` for adapter ``name``."""
    return (_only_live_adapter(m, name) and name not in getattr(m, "lora_variant", {})
            and isinstance(m.lora_dropout[name], nn.Identity) and m.lora_B[name].bias is None
            and isinstance(m.lora_A[name], nn.Linear) and isinstance(m.lora_B[name], nn.Linear))


@torch.no_grad()
def _own_unquantized_tensors(model: nn.Module) -> None:
    """Copy a CPU-loaded quantized model's full-precision tensors (embeddings, norms, head) into memory of its
    own. transformers leaves them as views of the memory-mapped safetensors file, and that mapping then keeps in
    the process's RSS every page the quantization read: all the full-precision block weights (405 MiB for
    SmolLM2-135M in nf4, more than the 4-bit model itself). Without the views the file is unmapped."""
    import bitsandbytes as bnb

    quantized = tuple(getattr(bnb.nn, n) for n in ("Params4bit", "Int8Params") if hasattr(bnb.nn, n))
    for t in [*model.parameters(), *model.buffers()]:  # each tensor once (a tied head is the embedding)
        if not isinstance(t, quantized):
            t.data = t.data.clone()


def _peft_quantized_lora_types() -> tuple:
    """peft's LoRA modules on bitsandbytes' 4- and 8-bit linears (none without bitsandbytes). Their forward is
    lora.Linear's plus a defensive copy of the base output, so the lean forward serves them too: in an nf4
    training pass on a CPU, peft's forward cost ~300 MiB of peak memory more (the copy, the mul and the add
    over every module's output)."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return ()
    return tuple(getattr(peft_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(peft_bnb, n))


def _lean_forward(m: nn.Module):
    """peft LoRA module ``m``'s forward, computing ``base(x) + scaling * (A x) B^T`` with the last matmul fused
    with the add (``addmm(base(x), A x, B^T, alpha=scaling)``) whenever its one active adapter is plain
    (:func:`_plain_lora`); peft's forward otherwise (adapters off, merged, several active, dropout, DoRA, extra
    arguments). peft adds ``B(A x) * scaling`` to the base output: a mul and an add over the whole (tokens,
    d_out) output, forward and backward, in 7 modules per layer: 9% + 5% of a SmolLM2 training step's CPU time
    (``benchmarks/bench_train_step.py --profile``). Same value up to the rounding of the fused add."""
    peft_forward = type(m).forward

    def forward(x, *args, **kwargs):
        act = m.active_adapters
        if args or kwargs or len(act) != 1 or not _plain_lora(m, act[0]):
            return peft_forward(m, x, *args, **kwargs)
        name = act[0]
        A, B = m.lora_A[name].weight, m.lora_B[name].weight
        result = m.base_layer(x)
        h = torch.nn.functional.linear(x.to(A.dtype), A)  # (..., r)
        return _add_lora(result, h, B, m.scaling[name])
    return forward


def _add_lora(result: torch.Tensor, h: torch.Tensor, B: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``result + alpha * h B^T`` as one addmm (h = A x, (..., r)), in the adapter's dtype, returned in
    ``result``'s: the last step of both lean LoRA forwards. Without autograd, into ``result`` itself when it
    is the adapter's dtype (the base output is this module's own temporary): no copy of the (tokens, d_out)
    output per module, the same values."""
    if not torch.is_grad_enabled() and result.dtype == h.dtype and result.is_contiguous():
        result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t(), alpha=alpha)
        return result
    out = torch.addmm(result.reshape(-1, result.shape[-1]).to(h.dtype), h.reshape(-1, h.shape[-1]), B.t(),
                      alpha=alpha)
    return out.view(result.shape).to(result.dtype)


def _lean_row_scaled_forward(m: nn.Module, name: str, s: torch.Tensor, mod_name: str):
    """``base(x) + (A x * scaling * s_row) B^T`` for the rows of x (rows, ..., d_in), the last matmul fused
    with the add (addmm); same value as peft's forward with the rows of ``A x`` scaled. For a module that
    :func:`_plain_lora` accepted: per call only what a role switch can change is checked again."""
    A, B, base = m.lora_A[name].weight, m.lora_B[name].weight, m.base_layer
    s = (s.float() * float(m.scaling[name])).to(A.device, A.dtype)

    def forward(x, *args, **kwargs):
        if not _only_live_adapter(m, name):  # adapters switched off or swapped inside the context: peft decides
            return type(m).forward(m, x, *args, **kwargs)
        _check_rows(s, x.shape[0], mod_name)
        result = base(x, *args, **kwargs)
        h = torch.nn.functional.linear(x.to(A.dtype), A)  # (rows, ..., r)
        sv = _row_view(s, h)
        h = h * sv if torch.is_grad_enabled() else h.mul_(sv)
        return _add_lora(result, h, B)
    return forward


@dataclass
class LMHead:
    """What the fused log-prob kernel needs of the output layer in the current role."""

    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None  # (V,)
    lora_a: torch.Tensor | None = None  # (r, d)
    lora_b: torch.Tensor | None = None  # (V, r)
    lora_scale: float = 1.0
    softcap: float | None = None  # final-logit softcapping c (Gemma-2): logits c tanh(x / c)


class ModelBundle:
    """A base causal LM loaded once, with named LoRA adapters and scalar heads."""

    def __init__(self, model: nn.Module, tokenizer, cfg: ModelConfig, device: torch.device,
                 dtype: torch.dtype):
        self.base = model  # transformers CausalLM (LoRA layers get injected in place)
        self.peft = None  # peft.PeftModel once an adapter exists
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.heads = nn.ModuleDict()
        self.head_weights: dict[str, torch.Tensor] = {}  # multi-output head -> weights combining its outputs
        self.head_attributes: dict[str, list[str]] = {}  # multi-output head -> the names of its outputs
        self.adapter_configs: dict[str, LoraConfig] = {}
        self.frozen: set[str] = set()  # adapters that never train, whatever peft's set_adapter says
        self._params: dict[str, list[nn.Parameter]] = {}  # adapter -> its LoRA parameters (cached)
        self.reference_adapter: str | None = None  # None: the reference role is the base, adapters off
        self._role = REFERENCE
        self._adapter: str | None = None  # the active adapter (None: adapters disabled)
        self.source: str | None = None  # the directory (or hub id) the base was loaded from
        self.rows_pinned = False  # inside row_scales: each batch row is one variant, rows cannot be dropped

    # ---- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, cfg: ModelConfig, tokenizer=None) -> ModelBundle:
        """Load the base once (``tokenizer``: one already loaded from the same path, to reuse)."""
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if cfg.backend == "unsloth":
            check_unsloth_available()
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        path = resolve_path(cfg.name_or_path, cfg.gguf_file)
        kw = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        if cfg.quantization == "nf4":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True)
        elif cfg.quantization == "int8":
            kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        if cfg.quantization != "none":
            kw["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None
                                else str(device)}
        if cfg.backend == "unsloth":  # pragma: no cover - GPU only
            from unsloth import FastLanguageModel

            model, tok = FastLanguageModel.from_pretrained(
                path, dtype=dtype, load_in_4bit=cfg.quantization == "nf4",
                load_in_8bit=cfg.quantization == "int8")
        else:
            tok = tokenizer if tokenizer is not None else load_tokenizer(path, cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        if cfg.quantization == "none":
            model.to(device)
        else:
            freeze_quantized_base(model)
            guard_avx512bf16(model)
            if device.type == "cpu":
                _own_unquantized_tensors(model)
        if cfg.gradient_checkpointing is True:  # "auto" that no run resolved: off
            # reentrant: the forward runs without autograd inside each layer, so no graph nodes are left
            # between the layer's freed temporaries. Non-reentrant's were, and on a CPU glibc could not reuse
            # the holes: 1.2 GB more peak RSS for a SmolLM2 micro-batch (benchmarks/RESULTS.md)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        if cfg.disable_dropout:
            disable_dropout(model)
        for p in model.parameters():
            p.requires_grad_(False)
        tok.padding_side = "left"
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model.config.use_cache = True
        bundle = cls(model, tok, cfg, device, dtype)
        bundle.source = path
        if cfg.gradient_checkpointing is True:
            bundle._recompute_in_forward_role()
        return bundle

    def _recompute_in_forward_role(self) -> None:
        """Make each checkpointed layer's backward recompute run in the role its forward ran in. The active
        adapter is module state that the recompute reads when ``backward()`` is called: a value forward inside
        ``use("value")`` whose loss is backpropagated after the block (policy active again) would otherwise
        recompute the policy's activations and give the value adapter no gradient."""
        for m in self.base.modules():
            ckpt = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(m, "gradient_checkpointing", False) and ckpt is not None:
                m._gradient_checkpointing_func = self._checkpoint_in_role(ckpt)

    def _checkpoint_in_role(self, checkpoint):
        def checkpoint_in_role(function, *args, **kwargs):
            role = self._role

            def in_role(*a, **k):  # the forward (role unchanged) and the backward's recompute
                if self._role == role:
                    return function(*a, **k)
                with self.use(role):
                    return function(*a, **k)
            return checkpoint(in_role, *args, **kwargs)
        return checkpoint_in_role

    # ---- adapters and heads -----------------------------------------------------------------------

    def add_adapter(self, name: str, lora: LoraConfig, init_from: str | None = None) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from peft.tuners import lora as peft_lora

        if name == REFERENCE or name in self.adapter_configs:
            raise ValueError(f"adapter name '{name}' is reserved or already exists")
        prev = self._adapter
        targets = resolve_target_modules(self.base, lora.target_modules)  # "auto" -> this model's projections
        r, alpha = peft_rank(lora)
        pcfg = PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=lora.dropout,
                              target_modules=targets, bias="none", task_type="CAUSAL_LM")
        if self.peft is None:
            self.peft = get_peft_model(self.base, pcfg, adapter_name=name)
        else:
            self.peft.add_adapter(name, pcfg)
        self.adapter_configs[name] = lora
        if init_from:
            self.load_adapter(name, init_from)
        elif lora.init == "loftq":
            self._loftq_init(name)
        guard_avx512bf16(self.base)
        lean = (peft_lora.Linear, *_peft_quantized_lora_types())
        for m in self.base.modules():
            if type(m) in lean and "forward" not in vars(m):  # once per module, for every adapter
                m.forward = _lean_forward(m)
        self._activate(name)
        if prev is not None:
            self._activate(prev)  # a further adapter (value, reward, reference) leaves the active role alone

    @torch.no_grad()
    def _loftq_init(self, name: str) -> None:
        """LoftQ (Li et al. 2023, arXiv 2310.08659), one step: for every LoRA module of adapter ``name`` on a
        4-bit layer, with W the full-precision weight (read from the source's safetensors), Q its nf4 value as
        the layer dequantizes it and U S V^T the SVD of the error W - Q, set

            B = U_r S_r^{1/2} / sqrt(scale),   A = S_r^{1/2} V_r^T / sqrt(scale)

        so that the layer computes x (Q + scale * B A)^T = x (Q + U_r S_r V_r^T)^T: the best rank-r correction
        of the quantization error (Eckart-Young). Modules whose weight the source lacks are left as they are.

        With ``lora.loftq_rank = k > 0`` the adapter has k + r ranks: the first k hold that correction and never
        train (their gradients are zeroed by hooks, so Adam leaves them where they are; keep weight decay at 0),
        the last r start as a fresh LoRA (B = 0) at scale alpha / r."""
        import bitsandbytes as bnb
        from tqdm.auto import tqdm

        from lowalign.models import safetensors_reader

        frozen = self.adapter_configs[name].loftq_rank  # > 0: the first ranks hold the correction, frozen
        read = safetensors_reader(self.source or "")
        if read is None:
            raise ConfigError(f"lora.init: loftq reads the full-precision weights from safetensors, and "
                              f"{self.source} has none (pytorch_model.bin only, or not cached)")
        mods = [(n, m) for n, m in self.base.named_modules()
                if hasattr(m, "lora_A") and name in m.lora_A
                and isinstance(m.get_base_layer(), bnb.nn.Linear4bit)]
        fixed = 0
        for mod_name, m in tqdm(mods, desc="loftq init", unit="layer", leave=False):
            w = read(mod_name + ".weight")  # the LoRA layers sit in the base's own modules: its names
            if w is None:
                continue
            layer = m.get_base_layer()
            q = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
            if w.shape != q.shape:
                continue
            u, sv, vh = torch.linalg.svd(w.to(q.device) - q, full_matrices=False)
            r, scale = frozen or m.r[name], float(m.scaling[name])
            root = sv[:r].sqrt() / scale ** 0.5
            a, b = m.lora_A[name].weight, m.lora_B[name].weight
            b[:, :r].copy_((u[:, :r] * root).to(b.dtype))
            a[:r].copy_((root[:, None] * vh[:r]).to(a.dtype))
            if frozen:  # the correction's ranks never train: their gradients are zeroed (Adam then leaves them)
                keep_a = torch.ones_like(a)
                keep_a[:r] = 0
                keep_b = torch.ones_like(b)
                keep_b[:, :r] = 0
                a.register_hook(lambda g, k=keep_a: g * k)
                b.register_hook(lambda g, k=keep_b: g * k)
            fixed += 1
        if not fixed:
            raise ConfigError(f"lora.init: loftq found no 4-bit layer under adapter '{name}' whose weight "
                              f"{self.source} holds (set model.quantization: nf4)")

    def freeze_copy(self, name: str, copy: str = INIT_REFERENCE) -> None:
        """Adapter ``copy``: a frozen copy of adapter ``name`` as it is now, made the reference role (the
        policy's starting point when that start is computed rather than loaded, as LoftQ's)."""
        from peft import get_peft_model_state_dict

        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft, adapter_name=name).items()}
        r, alpha = peft_rank(self.adapter_configs[name])  # the copy holds every rank, at the same scale
        self.add_adapter(copy, dataclasses.replace(self.adapter_configs[name], r=r, alpha=alpha, init="default",
                                                   loftq_rank=0))
        self._load_state(copy, state, f"a copy of adapter '{name}'")
        self.freeze_adapter(copy)
        self.reference_adapter = copy

    def add_head(self, name: str, out_features: int = 1) -> nn.Linear:
        head = nn.Linear(self.hidden_size, out_features).to(self.device, torch.float32)
        nn.init.normal_(head.weight, std=1.0 / (self.hidden_size + 1) ** 0.5)
        nn.init.zeros_(head.bias)
        self.heads[name] = head
        return head

    @property
    def hidden_size(self) -> int:
        return self.base.config.hidden_size

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        tag = f".{name}."
        return [p for n, p in self.base.named_parameters() if "lora_" in n and tag in n]

    def lora_factors(self, name: str) -> list[tuple[str, nn.Parameter, nn.Parameter, float]]:
        """(module name, A (r, d_in), B (d_out, r), scale) of every LoRA module of adapter ``name``;
        the module computes ``x A^T B^T * scale``."""
        out = []
        for mod_name, m in self.base.named_modules():
            if hasattr(m, "lora_A") and name in getattr(m, "lora_A", {}):
                out.append((mod_name, m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name])))
        return out

    @torch.no_grad()
    def base_weight(self, module: str, chunk: int = 2048) -> torch.Tensor:
        """The (d_out, d_in) float32 weight that the base layer under LoRA module ``module`` applies, read by
        running the layer on the identity (bias subtracted), ``chunk`` unit vectors at a time, so it is the
        same for plain, 4-bit, 8-bit and Conv1D layers: whatever the storage, this is what the forward computes."""
        layer = self.base.get_submodule(module).get_base_layer()
        d_in = getattr(layer, "in_features", None) or layer.nx  # transformers' Conv1D (GPT-2) names it nx
        bias = layer(torch.zeros(1, d_in, device=self.device, dtype=self.dtype)).float()
        cols = []
        for i in range(0, d_in, chunk):
            unit = torch.zeros(min(chunk, d_in - i), d_in, device=self.device, dtype=self.dtype)
            unit[:, i:i + unit.shape[0]].fill_diagonal_(1)
            cols.append((layer(unit).float() - bias).T)  # (d_out, columns i..i+chunk)
        return torch.cat(cols, 1)

    @contextlib.contextmanager
    def row_scales(self, name: str, scales: dict[str, torch.Tensor]):
        """Give every batch row its own scaling of adapter ``name``'s rank directions: inside, the LoRA module
        ``m`` (a name from :meth:`lora_factors`) computes for row ``b`` of its input

            base(x) + scale * B diag(scales[m][b]) A x            scales[m]: (rows, r)

        One batch then holds many variants of the adapter that differ only there, e.g. ESSA's population
        members, whose updates ``U diag(s) V^T`` share ``U`` and ``V``. Modules not named keep their weights as
        they are. A plain LoRA module (the only active adapter, unmerged, no dropout, no DoRA) runs a lean
        forward for the duration: ``h = A x``, ``h *= scale * scales`` in place (out of place under autograd),
        ``base(x) + h B^T`` as one addmm, where peft's forward would add a mul and an add over the layer's
        whole (rows, d_out) output; any other module keeps peft's forward with a hook scaling ``A x``."""
        patched, handles = [], []
        self.rows_pinned = True  # every forward inside has exactly these rows: generation must not drop any
        try:
            for mod_name, m in self.base.named_modules():
                if mod_name in scales and hasattr(m, "lora_A") and name in getattr(m, "lora_A", {}):
                    s = scales[mod_name]
                    if _plain_lora(m, name):
                        patched.append((m, vars(m).get("forward")))
                        m.forward = _lean_row_scaled_forward(m, name, s, mod_name)
                    else:
                        handles.append(m.lora_A[name].register_forward_hook(_scale_rows_hook(s, mod_name)))
            missing = set(scales) - {n for n, m in self.base.named_modules() if hasattr(m, "lora_A")}
            if missing:
                raise KeyError(f"row_scales: no LoRA module {sorted(missing)[:3]} of adapter '{name}'")
            yield self
        finally:
            self.rows_pinned = False
            for m, before in patched:
                if before is None:
                    del m.forward  # the class's (peft's) forward again
                else:
                    m.forward = before
            for h in handles:
                h.remove()

    def _activate(self, name: str) -> None:
        self.peft.base_model.set_adapter(name)
        # peft's set_adapter also freezes every inactive adapter, which silently drops gradients of a graph
        # already built in another role (a policy forward, then a value forward, then one backward). Every
        # adapter that is not frozen stays trainable; inactive ones are simply absent from the forward.
        for n in self.adapter_configs:
            if n not in self._params:
                self._params[n] = self.adapter_parameters(n)
            for p in self._params[n]:
                p.requires_grad_(n not in self.frozen)
        self._role = self._adapter = name

    def freeze_adapter(self, name: str) -> None:
        self.frozen.add(name)
        for p in self.adapter_parameters(name):
            p.requires_grad_(False)

    @contextlib.contextmanager
    def use(self, role: str):
        """Switch roles without copying the base. ``"reference"`` disables all adapters, or activates the
        frozen starting adapter when one was set with :meth:`set_reference_adapter`."""
        if role != REFERENCE and role not in self.adapter_configs:
            raise KeyError(f"unknown role '{role}'; have: {[REFERENCE, *self.adapter_configs]}")
        prev_role, prev_adapter = self._role, self._adapter
        try:
            if role == REFERENCE and self.reference_adapter is None:
                ctx = self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()
                self._role, self._adapter = REFERENCE, None
                with ctx:
                    yield self
            else:
                self._activate(self.reference_adapter if role == REFERENCE else role)
                self._role = role
                yield self
        finally:
            if prev_adapter is not None:
                self._activate(prev_adapter)
            self._role, self._adapter = prev_role, prev_adapter

    def set_reference_adapter(self, directory: str | Path) -> None:
        """Make the reference role a frozen copy of the adapter saved in ``directory`` (the policy's
        starting point), as one more adapter on the same base: never a second base."""
        self.add_adapter(INIT_REFERENCE, saved_lora_config(Path(directory)))
        self.load_adapter(INIT_REFERENCE, directory)
        self.freeze_adapter(INIT_REFERENCE)
        self.reference_adapter = INIT_REFERENCE

    def set_reference_soup(self, directories: list[str | Path]) -> None:
        """Make the reference role the element-wise average of the adapters saved in ``directories`` (a weight
        soup, SALSA), loaded as one more frozen adapter on the same base: never a second base."""
        from safetensors.torch import load_file

        dirs = [Path(d) for d in directories]
        cfg0 = saved_lora_config(dirs[0])
        states = [load_file(str(d / "adapter_model.safetensors"), device=str(self.device)) for d in dirs]
        for d, st in zip(dirs[1:], states[1:]):
            if st.keys() != states[0].keys() or any(st[k].shape != states[0][k].shape for k in st):
                raise ValueError(f"reference soup: the adapter in {d} does not match the one in {dirs[0]} "
                                 "(rank and target modules must be the same)")
        avg = {k: torch.stack([st[k].float() for st in states]).mean(0).to(states[0][k].dtype) for k in states[0]}
        self.add_adapter(INIT_REFERENCE, cfg0)
        self._load_state(INIT_REFERENCE, avg, f"the soup of {len(dirs)} adapters")
        self.freeze_adapter(INIT_REFERENCE)
        self.reference_adapter = INIT_REFERENCE

    @property
    def role(self) -> str:
        return self._role

    @contextlib.contextmanager
    def eval_mode(self):
        """Evaluation runs in eval mode (dropout, if any is left, off); the previous mode comes back."""
        was = self.base.training
        self.base.eval()
        try:
            yield self
        finally:
            if was:
                self.base.train()

    # ---- forward pieces ------------------------------------------------------------------------

    @property
    def causal_lm(self) -> nn.Module:
        return self.base  # LoRA layers are injected in place, so this follows the active role

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Backbone output (final norm applied, no lm_head): (B, T, d). Position ids follow the attention
        mask, exactly as HF generation computes them, so left-padded rows score what was sampled."""
        pos = position_ids_from_mask(attention_mask)
        out = self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                      use_cache=False)
        return out.last_hidden_state

    def lm_head(self) -> LMHead:
        head = self.base.get_output_embeddings()
        base_layer = getattr(head, "base_layer", head)
        text_cfg = self.base.config.get_text_config()
        out = LMHead(weight=base_layer.weight, bias=base_layer.bias,
                     softcap=getattr(text_cfg, "final_logit_softcapping", None) or None)
        if self._adapter is not None and hasattr(head, "lora_A") and self._adapter in getattr(head, "lora_A", {}):
            out.lora_a = head.lora_A[self._adapter].weight
            out.lora_b = head.lora_B[self._adapter].weight
            out.lora_scale = float(head.scaling[self._adapter])
        return out

    def add_likelihood_feature(self, head: str) -> None:
        """Give ``head`` a second input: the completion's mean token log-prob in the current role (fused
        log-prob path, same backbone pass), scaled by a learned (1 -> out) linear map initialised to 1."""
        lin = nn.Linear(1, self.heads[head].out_features).to(self.device, torch.float32)
        nn.init.ones_(lin.weight)
        nn.init.zeros_(lin.bias)
        self.heads[f"{head}__loglik"] = lin

    def score(self, head: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              target_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar head on the last non-pad token's hidden state, in the current role: (B, out). When the
        head has a likelihood feature, ``target_mask`` marks the completion whose mean log-prob it reads."""
        h = self.hidden_states(input_ids, attention_mask)
        last = last_token_index(attention_mask)  # (B,)
        out = self.heads[head](h[torch.arange(h.shape[0], device=h.device), last].float())
        if f"{head}__loglik" in self.heads:
            if target_mask is None:
                raise ValueError(f"head '{head}' reads the completion likelihood: pass target_mask")
            from lowalign.logprobs import logprobs_from_hidden

            lp = logprobs_from_hidden(self, h, input_ids, target_mask).logps  # (B, T)
            mean_lp = lp.sum(1) / target_mask.sum(1).clamp(min=1)
            out = out + self.heads[f"{head}__loglik"](mean_lp[:, None])
        return out

    @torch.no_grad()
    def score_attributes(self, adapter: str, prompts: list[str], completions: list[str],
                         batch_size: int = 256) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Learned reward of (prompt, completion) pairs: role ``adapter``, head ``adapter`` on the EOS
        position. Returns the reward (B,) (a multi-output head's outputs combined by ``head_weights``) and,
        for a multi-attribute head, each named output {attribute: (B,)} (else {}); on CPU."""
        from lowalign.generation import encode_completions

        out = []
        with self.use(adapter):
            for s in range(0, len(prompts), batch_size):
                b = encode_completions(self.tokenizer, prompts[s:s + batch_size], completions[s:s + batch_size],
                                       self.device)
                out.append(self.score(adapter, b.input_ids, b.attention_mask, b.target_mask).float().cpu())
        r = torch.cat(out)  # (B, K)
        w = self.head_weights.get(adapter)
        names = self.head_attributes.get(adapter, [])
        return (r @ w if w is not None else r[:, 0]), {a: r[:, i] for i, a in enumerate(names)}

    def score_texts(self, adapter: str, prompts: list[str], completions: list[str],
                    batch_size: int = 256) -> torch.Tensor:
        """The learned reward alone: (B,) on CPU (see :meth:`score_attributes`)."""
        return self.score_attributes(adapter, prompts, completions, batch_size)[0]

    def set_attribute_weights(self, adapter: str, weights: dict[str, float]) -> None:
        """Weigh a multi-attribute reward head's outputs by name (names left out weigh 0)."""
        names = self.head_attributes.get(adapter)
        if not names:
            raise ConfigError(f"attribute_weights: reward adapter '{adapter}' has a single output, no attributes")
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ConfigError(f"attribute_weights: unknown attribute(s) {unknown}; '{adapter}' has {names}")
        self.head_weights[adapter] = torch.tensor([float(weights.get(a, 0.0)) for a in names])

    def load_reward(self, name: str, path: str | Path) -> None:
        """Add a trained reward adapter + head (a reward_model run's output) as one more role."""
        path = Path(path)
        if (path / "adapters").is_dir():
            path = path / "adapters"
        meta_f, acfg_f = path / "reward_meta.json", path / name / "adapter_config.json"
        if not meta_f.exists() or not acfg_f.exists():
            raise ConfigError(f"rewards: {path} holds no reward adapter '{name}' (expected {acfg_f} and {meta_f})")
        self.add_adapter(name, saved_lora_config(path / name))
        self.load_adapter(name, path / name)
        self.load_heads(path / "heads.safetensors")
        meta = json.loads(meta_f.read_text())
        if meta.get("weights"):
            self.head_weights[name] = torch.tensor(meta["weights"], dtype=torch.float32)
            self.head_attributes[name] = list(meta["attributes"])
        for h in [k for k in self.heads if k == name or k.startswith(f"{name}__")]:
            self.heads[h].requires_grad_(False)
        self.freeze_adapter(name)

    @torch.no_grad()
    def calibrate_nf4(self, texts: list[str], batch_size: int = 16) -> dict:
        """GPTQ onto the nf4 grid (:mod:`lowalign.quantize`, act-order, each block's scale its absmax) for every
        4-bit linear of the decoder layers, calibrated on ``texts``; call before any adapter is added. The
        result is cached in ``$LOWALIGN_CACHE``, keyed by the model's weights and the texts, so a resumed run
        or an export gets the same weights without recomputing. Returns ``{"layers", "tokens", "cached", "path"}``."""
        import hashlib

        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        import lowalign.quantize as Q
        from lowalign.gguf_source import cache_root
        from lowalign.models import fingerprint, safetensors_reader

        if self.peft is not None:
            raise RuntimeError("calibrate_nf4: adapters are attached already")
        if self.cfg.quantization != "nf4":
            raise ConfigError("model.gptq_rows: GPTQ calibrates an nf4 base; set model.quantization: nf4")
        read = safetensors_reader(self.source or "")
        if read is None:
            raise ConfigError(f"model.gptq_rows: GPTQ reads the full-precision weights from safetensors, and "
                              f"{self.source} has none (pytorch_model.bin only, or not cached)")
        key = f"gptq-nf4 v1 damp=0.01 act_order\n{fingerprint(self.cfg.name_or_path, self.cfg.gguf_file)}"
        h = hashlib.sha256(key.encode())
        for t in texts:
            h.update(hashlib.sha256(t.encode()).digest())
        path = cache_root() / "nf4-gptq" / f"{h.hexdigest()[:24]}.safetensors"
        modules = dict(self.base.named_modules())

        def encoded():
            enc = [self.tokenizer(texts[s:s + batch_size], return_tensors="pt", padding=True).to(self.device)
                   for s in range(0, len(texts), batch_size)]
            return enc, int(sum(e["attention_mask"].sum() for e in enc))

        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # the token count is stored with the weights (older: recount)
                tokens = (f.metadata() or {}).get("tokens")
                stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            names = sorted({k.rsplit(".", 1)[0] for k in stored})
            for n in names:
                Q.set_nf4_weight(modules[n], stored[f"{n}.codes"], stored[f"{n}.absmax"])
            return {"layers": len(names), "tokens": int(tokens) if tokens else encoded()[1], "cached": True,
                    "path": str(path)}
        enc, tokens = encoded()
        was_training = self.base.training
        self.base.eval()
        try:
            written = Q.calibrate_nf4(self.base, [{k: e[k] for k in ("input_ids", "attention_mask")} for e in enc],
                                      read, lambda it: tqdm(it, desc="gptq nf4", unit="layer", leave=False),
                                      act_order=True)
        finally:
            self.base.train(was_training)
        if not written:
            raise ConfigError(f"model.gptq_rows: no 4-bit linear of {self.source} has a full-precision weight in "
                              "its safetensors")
        tensors = {}
        for n, (packed, absmax) in written.items():
            tensors[f"{n}.codes"], tensors[f"{n}.absmax"] = packed.cpu().contiguous(), absmax.cpu().contiguous()
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"tokens": str(tokens)}))
        return {"layers": len(written), "tokens": tokens, "cached": False, "path": str(path)}

    # ---- export ---------------------------------------------------------------------------------

    @torch.no_grad()
    def dequantize_base(self) -> int:
        """Replace every bitsandbytes 4-bit linear of the base with a full-precision ``nn.Linear`` holding its
        dequantized weight: the model an nf4 run trained its adapter against, in full precision (export merges
        there, never into 4-bit weights). Call before any adapter is added; returns how many were replaced."""
        if self.peft is not None:
            raise RuntimeError("dequantize_base: adapters are attached already")
        import bitsandbytes as bnb

        n = 0
        for name, mod in list(self.base.named_modules()):
            if not isinstance(mod, bnb.nn.Linear4bit):
                continue
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(self.dtype)
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=self.dtype,
                            device=w.device)
            lin.weight.copy_(w)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.to(self.dtype))
            parent, _, child = name.rpartition(".")
            setattr(self.base.get_submodule(parent) if parent else self.base, child, lin)
            n += 1
        self.base.requires_grad_(False)
        self.base.hf_quantizer = None  # plain weights now: transformers refuses to save a quantized model
        self.base.is_loaded_in_4bit = False
        if hasattr(self.base.config, "quantization_config"):
            del self.base.config.quantization_config
        return n

    @torch.no_grad()
    def merged(self, name: str) -> nn.Module:
        """The base with adapter ``name`` merged into its weights (W + scale B A), every other adapter
        removed: a plain transformers model. The bundle is spent afterwards."""
        if name not in self.adapter_configs:
            raise KeyError(f"unknown adapter '{name}'; have: {list(self.adapter_configs)}")
        self._activate(name)
        model = self.peft.merge_and_unload(adapter_names=[name])
        self.peft = None
        self.adapter_configs.clear()
        return model

    # ---- saving ---------------------------------------------------------------------------------

    def save_adapter(self, name: str, directory: str | Path) -> Path:
        """Standard PEFT format (adapter_config.json + adapter_model.safetensors), written atomically."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            self.peft.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
            src = tmp / name if (tmp / name).is_dir() else tmp  # peft nests non-default adapters
            replace_dir(src, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return directory

    def load_adapter(self, name: str, directory: str | Path) -> None:
        from safetensors.torch import load_file

        directory = Path(directory)
        f = directory / "adapter_model.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"no adapter_model.safetensors in {directory}")
        self._load_state(name, load_file(str(f), device=str(self.device)), f"adapter at {directory}")

    def _load_state(self, name: str, state: dict, what: str) -> None:
        from peft.utils import set_peft_model_state_dict

        res = set_peft_model_state_dict(self.peft, state, adapter_name=name)
        if res.unexpected_keys:
            raise ValueError(f"{what} does not fit adapter '{name}': unexpected {res.unexpected_keys[:3]}")

    def save_heads(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        meta = {"shapes": json.dumps({n: list(h.weight.shape) for n, h in self.heads.items()})}
        atomic_write(Path(path), lambda p: save_file(state, str(p), metadata=meta))

    def load_heads(self, path: str | Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            shapes = json.loads(f.metadata()["shapes"])
        for name, (out, inp) in shapes.items():
            if name not in self.heads:
                if inp == 1 and name.endswith("__loglik"):
                    self.add_likelihood_feature(name.removesuffix("__loglik"))
                else:
                    self.add_head(name, out)
        # only the heads this file holds: a reward run's file next to this run's own value head
        res = self.heads.load_state_dict(load_file(str(path), device=str(self.device)), strict=False)
        if res.unexpected_keys:
            raise ValueError(f"{path}: unexpected head weights {res.unexpected_keys[:3]}")

    # ---- memory ---------------------------------------------------------------------------------

    def memory_report(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Bytes held by the base weights, each adapter, each head, and the optimizer state."""
        report: dict[str, int] = {"base": 0}
        adapter_ptrs = {}
        for name in self.adapter_configs:
            ps = self.adapter_parameters(name)
            report[f"adapter:{name}"] = sum(_nbytes(p) for p in ps)
            adapter_ptrs.update({p.data_ptr(): name for p in ps})
        seen = set()
        for t in [*self.base.parameters(), *self.base.buffers()]:
            ptr = t.data_ptr()
            if ptr in adapter_ptrs or ptr in seen:
                continue
            seen.add(ptr)
            report["base"] += _nbytes(t)
        for name, h in self.heads.items():
            report[f"head:{name}"] = sum(_nbytes(p) for p in h.parameters())
        if optimizer is not None:
            report["optimizer"] = sum(_nbytes(v) for st in optimizer.state.values()
                                      for v in st.values() if torch.is_tensor(v))
        report["total"] = sum(v for k, v in report.items())
        return report


def peft_rank(lora: LoraConfig) -> tuple[int, float]:
    """(rank, alpha) of the PEFT adapter a LoRA config builds: lora.r and lora.alpha, or with LoftQ's frozen
    ranks (``lora.loftq_rank``) those k ranks more, alpha raised to keep the scale alpha / r."""
    if lora.init == "loftq" and lora.loftq_rank:
        return lora.r + lora.loftq_rank, lora.alpha * (lora.r + lora.loftq_rank) / lora.r
    return lora.r, lora.alpha


def saved_lora_config(directory: Path) -> LoraConfig:
    """The LoRA shape of a saved PEFT adapter (its adapter_config.json), dropout off."""
    f = Path(directory) / "adapter_config.json"
    if not f.exists():
        raise ConfigError(f"{directory}: no adapter_config.json (not a saved PEFT adapter)")
    acfg = json.loads(f.read_text())
    return LoraConfig(r=acfg["r"], alpha=acfg["lora_alpha"], target_modules=sorted(acfg["target_modules"]),
                      dropout=0.0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over attended tokens; 1 on padding (as transformers' generate does): (B, T)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position per row (works for left or right padding): (B,)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return (pos * attention_mask.long()).max(dim=1).values


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
