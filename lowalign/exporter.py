"""`lowalign export`: what a run aligned, as files other tools run.

* ``merged``: the base with the run's policy adapter merged into its weights (W + (alpha/r) B A), saved as a
  standard transformers directory (safetensors, config, the source's tokenizer and chat template, generation
  config) that plain ``AutoModelForCausalLM.from_pretrained`` loads. ``--role NAME`` exports another adapter of
  the run instead (a reward model's ``reward``, PPO's ``value``), with the run's head file copied beside it.
* ``gguf``: the merged model as one GGUF file, written in Python with the ``gguf`` package's writer (no
  llama.cpp build): tensor names from the package's map for the architecture, Llama's q/k rows permuted and
  Gemma's norm weights stored as 1 + w (the layouts llama.cpp uses and transformers' GGUF reader undoes),
  the tokenizer copied from the source GGUF (or built from a BPE ``tokenizer.json``), the chat template
  carried over. Matrices in f32/f16/bf16 or a type the package can encode (q8_0, q5_1, q5_0, q4_1, q4_0);
  vectors (norms, biases) stay f32. Default: the source GGUF's type.

A base trained in nf4 is reloaded in full precision with each 4-bit linear dequantized (the weights the adapter
was trained against, so the export computes what the run evaluated, and a LoftQ adapter, which holds the
quantization error's correction, stays right); int8 bases are reloaded from the full-precision source. Nothing
is merged into 4-bit weights.

Every check runs before a model loads: the run directory and its adapter, the formats, an architecture the
GGUF writer cannot map (named, with those it can), whether the GGUF's header reads back as the model's
config in transformers, an existing output (refused unless ``overwrite``), and free disk against the
estimated size. Outputs are written beside their destination under a temporary name and renamed at the end.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowalign import config as C
from lowalign.runtime import atomic_write, replace_dir

FORMATS = ("merged", "gguf")
FLOATS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
QUANTS = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# model_type -> GGUF architecture the writer maps (and transformers' GGUF reader reads back)
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                     "q4_1": 20 / 32, "q4_0": 18 / 32}
# GGUF general.file_type -> the type this writer defaults to (itself where the gguf package can encode it; the
# nearest it can at no fewer bits for the k-quants and i-quants it cannot)
_FILE_TYPE_DEFAULT = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 32: "bf16",
                      10: "q4_0", 11: "q4_0", 12: "q4_0", 13: "q4_0", 14: "q4_1", 15: "q4_1", 16: "q5_1",
                      17: "q5_1", 18: "q8_0"}
MARKER = "lowalign_export.json"


class ExportError(ValueError):
    """Bad export input: names the argument or file."""


@dataclass
class ExportPlan:
    """What :func:`export` will do, decided before any weight is read."""

    root: Path  # the run directory
    adapter_dir: Path  # adapters/<role> of the run or of one of its checkpoints
    role: str
    model: C.ModelConfig  # the run's model section
    loftq: bool
    format: str
    type: str  # f32/f16/bf16 or a quantized GGUF type
    out: Path
    model_type: str
    n_params: int
    est_bytes: int
    notes: list[str]
    heads: Path | None = None  # heads.safetensors to copy (an adapter with a scalar head)


# ---- checks (no model loaded) -------------------------------------------------------------------------------


def _find_adapter(run_dir: str | Path, role: str) -> tuple[Path, Path]:
    p = Path(run_dir).expanduser()
    if not p.is_dir():
        raise ExportError(f"RUN_DIR: {p} is not a directory")
    from lowalign.api import run_root

    root = run_root(p)
    if root is not None:  # the run directory, or one of its checkpoints (checkpoints/step_N)
        adapters = p / "adapters"
    elif p.name == "checkpoints" and (p.parent / "config.yaml").is_file():
        raise ExportError(f"RUN_DIR: {p} holds checkpoints; name one of them (step_*) or the run directory")
    else:
        raise ExportError(f"RUN_DIR: {p} is not a lowalign run directory (no config.yaml) nor one of its "
                          "checkpoints")
    a = adapters / role
    if C.is_saved_adapter(a):
        return root, a
    have = sorted(d.name for d in adapters.iterdir() if (d / "adapter_config.json").is_file()) \
        if adapters.is_dir() else []
    hint = ""
    if adapters == root / "adapters" and (root / "checkpoints" / "latest").is_file():
        latest = (root / "checkpoints" / "latest").read_text().strip()
        hint = (f"; the run has not finished: export its latest checkpoint with `lowalign export "
                f"{root / 'checkpoints' / latest} ...`")
    raise ExportError(f"RUN_DIR: {p} has no {role} adapter ({a}/adapter_model.safetensors)"
                      + (f"; it has {have} (--role)" if have else "") + hint)


def _default_type(model: C.ModelConfig, source_dtype: torch.dtype | None) -> tuple[str, str | None]:
    """The source's type for a GGUF (with a note when the writer cannot encode it), else its float dtype."""
    from lowalign.models import gguf_path

    f = gguf_path(model.name_or_path, model.gguf_file)
    if f is not None:
        from lowalign.gguf_source import read_header

        ft = read_header(f).metadata.get("general.file_type")
        t = _FILE_TYPE_DEFAULT.get(ft, "q8_0")
        import gguf

        known = {int(m): m.name.removeprefix("MOSTLY_") for m in gguf.LlamaFileType}
        src = known.get(ft, str(ft))
        note = None if src.lower() == t or (src == "ALL_F32" and t == "f32") else \
            f"the source's type {src} is not one the gguf package encodes; writing {t}"
        return t, note
    return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(source_dtype, "f32"), None


def plan_export(run_dir: str | Path, out: str | Path, format: str = "merged", dtype: str | None = None,
                quant: str | None = None, role: str = "policy", overwrite: bool = False) -> ExportPlan:
    """Every check of an export, before any weight is read; :class:`ExportError` naming the bad input."""
    from lowalign.models import read_config, skeleton

    if format not in FORMATS:
        raise ExportError(f"--format: '{format}' is not one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in FLOATS:
        raise ExportError(f"--dtype: '{dtype}' is not one of {', '.join(FLOATS)}")
    if quant is not None:
        quant = quant.lower()
        if format != "gguf":
            raise ExportError("--quant: quantized types are for --format gguf (a merged directory is f32/f16/bf16)")
        if quant not in QUANTS:
            raise ExportError(f"--quant: '{quant}' is not a type the gguf package encodes; use one of "
                              f"{', '.join(QUANTS)} (or --dtype f32/f16/bf16)")
        if dtype is not None:
            raise ExportError("--dtype and --quant both given: a GGUF's matrices get one type (vectors stay f32)")
    root, adapter_dir = _find_adapter(run_dir, role)
    raw = C.load_raw(root / "config.yaml")
    try:
        model = C.build(C.ModelConfig, raw.get("model") or {}, "model")
    except C.ConfigError as e:
        raise ExportError(f"{root / 'config.yaml'}: {e}") from e
    loftq = (raw.get("lora") or {}).get("init") == "loftq"
    config = read_config(model.name_or_path, model.trust_remote_code, model.gguf_file)
    if config is None:
        raise ExportError(f"the run's base model '{model.name_or_path}' is not available locally (not a directory, "
                          "not in the Hugging Face cache): export needs its weights")
    model_type = config.model_type
    notes: list[str] = []
    heads = None
    if role != "policy":
        if format != "merged":
            raise ExportError(f"--role {role}: a scoring adapter exports as --format merged (the causal LM plus "
                              "its head file); GGUF holds language models")
        # a run keeps heads.safetensors beside its adapters, a checkpoint beside its adapters/ folder
        heads = next((h for h in (adapter_dir.parent / "heads.safetensors",
                                  adapter_dir.parent.parent / "heads.safetensors") if h.is_file()), None)
    if format == "gguf":
        if model_type not in GGUF_ARCHS:
            raise ExportError(f"--format gguf: the GGUF writer cannot map architecture '{model_type}'; it maps "
                              f"{', '.join(sorted(set(GGUF_ARCHS) - {'gemma3'}))} (use --format merged)")
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            raise ExportError("--format gguf needs the gguf package: `pip install 'lowalign[real]'` (or `bash "
                              "scripts/install.sh --real`)") from e
        check_readback(config, GGUF_ARCHS[model_type])
    sk = skeleton(config, model.trust_remote_code)
    n_params = sum(p.numel() for p in sk.parameters())  # tied weights once
    src_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    src_dtype = getattr(torch, src_dtype) if isinstance(src_dtype, str) else src_dtype
    if format == "gguf":
        kind = quant or dtype
        if kind is None:
            kind, note = _default_type(model, src_dtype)
            if note:
                notes.append(note)
    else:
        kind = dtype or {torch.float16: "f16", torch.bfloat16: "bf16"}.get(src_dtype, "f32")
    est = int(n_params * _BYTES_PER_WEIGHT[kind] * 1.02)
    out = Path(out).expanduser()
    if format == "gguf" and out.suffix.lower() != ".gguf":
        raise ExportError(f"--out: {out}: name the GGUF file to write (ending in .gguf)")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ExportError(f"--out: {out} exists; choose another path or pass --overwrite")
        if out.is_dir() and format == "gguf":
            raise ExportError(f"--out: {out} is a directory; name the .gguf file to write")
        if out.is_dir() and any(out.iterdir()) and not ((out / MARKER).is_file() or (out / "config.json").is_file()):
            raise ExportError(f"--out: {out} is a directory with files that are not a model; --overwrite replaces "
                              "only an earlier export (or an empty directory)")
        if out.is_file() and format == "merged":
            raise ExportError(f"--out: {out} is a file; a merged export is a directory")
    base = out.parent
    while not base.exists():
        base = base.parent
    free = shutil.disk_usage(base).free
    if free < est + (64 << 20):
        raise ExportError(f"--out: {base} has {free / 2**20:.0f} MiB free; the export needs about "
                          f"{est / 2**20:.0f} MiB ({n_params / 1e6:.1f}M weights as {kind})")
    if model.quantization == "nf4":
        notes.append("the base was trained in nf4: reloaded in full precision with each 4-bit linear dequantized "
                     "(the weights the adapter was trained against), and merged there"
                     + (" (GPTQ-calibrated, as in training)" if model.gptq_rows else ""))
    elif model.quantization == "int8":
        notes.append("the base was trained in int8: reloaded in full precision from its source and merged there")
    return ExportPlan(root, adapter_dir, role, model, loftq, format, kind, out, model_type, n_params, est, notes,
                      heads)


# ---- loading and merging ------------------------------------------------------------------------------------


def merged_model(plan: ExportPlan):
    """(the base with the plan's adapter merged, float32 on the CPU; the bundle's tokenizer; the source
    directory)."""
    import dataclasses

    from lowalign.bundle import ModelBundle, saved_lora_config

    m = dataclasses.replace(plan.model, dtype="float32", device="cpu", gradient_checkpointing=False,
                            backend="hf", quantization="nf4" if plan.model.quantization == "nf4" else "none")
    bundle = ModelBundle.load(m)
    if m.gptq_rows:  # the calibrated 4-bit weights the run trained against (from the cache, or recomputed)
        from lowalign.api import calibrate_as_run

        calibrate_as_run(bundle, plan.root)
    if m.quantization == "nf4":
        bundle.dequantize_base()
    bundle.add_adapter(plan.role, saved_lora_config(plan.adapter_dir), init_from=str(plan.adapter_dir))
    model = bundle.merged(plan.role).eval()
    return model, bundle.tokenizer, bundle.source


def _source_dir(source: str) -> Path | None:
    from lowalign.models import model_directory

    p = Path(source)
    return p if p.is_dir() else model_directory(source)


# ---- writing ------------------------------------------------------------------------------------------------


def export(run_dir: str | Path, out: str | Path, format: str = "merged", dtype: str | None = None,
           quant: str | None = None, role: str = "policy", overwrite: bool = False, console=None) -> Path:
    """Export a run's adapter merged into its base (see the module docstring); returns the written path."""
    from rich.console import Console

    console = console or Console(stderr=True)
    plan = plan_export(run_dir, out, format, dtype, quant, role, overwrite)
    t0 = time.time()
    console.print(f"export: {plan.root.name} ({plan.role} adapter {plan.adapter_dir}) -> {plan.out} as "
                  f"{plan.format} {plan.type} (about {plan.est_bytes / 2**20:.0f} MiB)")
    for n in plan.notes:
        console.print(f"export: {n}")
    model, tok, source = merged_model(plan)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    if plan.format == "merged":
        _write_merged(plan, model, tok, source, console)
    else:
        _write_gguf(plan, model, tok, source, console)
    size = _size(plan.out)
    console.print(f"export: wrote {plan.out} ({size / 2**20:.1f} MiB) in {time.time() - t0:.0f} s")
    return plan.out


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _bar(console, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"export {what}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _provenance(plan: ExportPlan, source: str) -> dict:
    state = plan.adapter_dir.parent.parent / "state.json"
    step = None
    if state.is_file():
        step = json.loads(state.read_text()).get("step")
    elif (plan.root / "summary.json").is_file():
        step = json.loads((plan.root / "summary.json").read_text()).get("steps")
    return {"run": str(plan.root.resolve()), "adapter": str(plan.adapter_dir.resolve()), "role": plan.role,
            "step": step, "base": plan.model.name_or_path, "base_source": source, "format": plan.format,
            "type": plan.type, "trained_quantization": plan.model.quantization, "loftq": plan.loftq,
            "notes": plan.notes}


def _write_merged(plan: ExportPlan, model, tok, source: str, console) -> None:
    from lowalign.models import _TOKENIZER_FILES

    dt = FLOATS[plan.type]
    tmp = Path(tempfile.mkdtemp(dir=plan.out.parent, prefix=f".{plan.out.name}."))
    try:
        sd = {}
        items = list(model.state_dict().items())
        with _bar(console, "tensors") as bar:
            task = bar.add_task("cast", total=len(items))
            for k, v in items:
                sd[k] = v.to(dt) if v.is_floating_point() else v
                bar.advance(task)
        model.config.dtype = dt
        model.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        src = _source_dir(source)
        copied = []
        for name in (*_TOKENIZER_FILES, "generation_config.json"):
            if src is not None and (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                copied.append(name)
        if not any(n != "generation_config.json" for n in copied):
            tok.save_pretrained(str(tmp))
        if plan.heads is not None:
            shutil.copyfile(plan.heads, tmp / "heads.safetensors")
            meta = plan.heads.parent / "reward_meta.json"
            if meta.is_file():
                shutil.copyfile(meta, tmp / "reward_meta.json")
        (tmp / MARKER).write_text(json.dumps(_provenance(plan, source), indent=1))
        replace_dir(tmp, plan.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- GGUF --------------------------------------------------------------------------------------------------


def _rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rp:  # per layer type (Gemma-3)
        rp = rp["full_attention"]
    return float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _hparams(w, config, arch: str) -> None:
    """The architecture's hyper-parameters under the keys llama.cpp and transformers' GGUF reader use."""
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(config))
    w.add_vocab_size(int(config.vocab_size))
    hd = _head_dim(config)
    w.add_rope_dimension_count(hd)
    w.add_key_length(hd)
    w.add_value_length(hd)
    if arch == "gemma3" and getattr(config, "sliding_window", None):
        w.add_sliding_window(int(config.sliding_window))


_MATH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "rms_norm_eps", "rope_parameters", "rope_scaling", "vocab_size", "hidden_act",
              "hidden_activation", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
              "layer_types", "query_pre_attn_scalar", "final_logit_softcapping", "attn_logit_softcapping")


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_readback(config, arch: str, writer_fn=_hparams) -> None:
    """Write the header a GGUF of ``config`` would get, read it back with transformers' GGUF reader, and refuse
    when a setting that changes the model's output comes back different (GGUF has no key for it)."""
    import gguf
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "header.gguf"
        w = gguf.GGUFWriter(str(f), arch)
        writer_fn(w, config, arch)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        back = AutoConfig.from_pretrained(d, gguf_file=f.name).to_dict()
    mine = config.to_dict()
    diff = [f"{k}={mine[k]!r} (reads back as {back.get(k)!r})" for k in _MATH_KEYS
            if k in mine and not _same(mine[k], back.get(k))]
    if diff:
        raise ExportError(f"--format gguf: this {config.model_type} model has settings a GGUF file cannot carry for "
                          f"transformers' reader: {'; '.join(diff)}. Use --format merged")


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (the inverse of transformers' reverse
    permute): rows (head, half, i) -> (head, i, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str):
    """(GGUF name, float32 numpy array) of each weight of a merged model, in the layouts llama.cpp uses."""
    import gguf

    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, _, suffix = hf_name.rpartition(".")
        g = names.get_name(stem)
        if g is None:
            raise ExportError(f"--format gguf: no GGUF name for tensor '{hf_name}' of this {config.model_type} model")
        t = t.detach().float()
        if arch == "llama" and g.endswith("attn_q"):
            t = _permute_qk(t, heads)
        elif arch == "llama" and g.endswith("attn_k"):
            t = _permute_qk(t, kv)
        if arch in ("gemma2", "gemma3") and g.endswith("norm") and suffix == "weight":
            t = t + 1  # Gemma's RMSNorm scales by (1 + w); GGUF stores the factor
        yield f"{g}.{suffix}", t.numpy()


def _encode(data, kind: str):
    """(array, raw GGML type or None) for a tensor written as ``kind``; vectors stay f32, matrices whose rows do
    not split into the type's blocks fall back to f16."""
    import gguf
    from gguf import GGMLQuantizationType as T

    qt = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, **{q: T[q.upper()] for q in QUANTS}}[kind]
    if data.ndim < 2 or qt == T.F32:
        return data.astype("float32"), None
    block = gguf.GGML_QUANT_SIZES[qt][0]
    if data.shape[-1] % block:
        qt = T.F16
    if qt == T.F16:
        return data.astype("float16"), None
    return gguf.quants.quantize(data, qt), qt


def _tokenizer_fields(w, plan: ExportPlan, tok, src: Path | None, vocab: int, console) -> None:
    """Tokenizer and chat template: copied from the source GGUF when the model came from one, else built from a
    BPE tokenizer.json; without either the file holds the weights only (said on the console)."""
    import gguf

    from lowalign.models import gguf_path

    f = gguf_path(plan.model.name_or_path, plan.model.gguf_file)
    if f is not None:
        r = gguf.GGUFReader(str(f))
        for key, field in r.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub_type=sub)
        return
    tj = src / "tokenizer.json" if src is not None else None
    spec = json.loads(tj.read_text()) if tj is not None and tj.is_file() else None
    if spec is None or (spec.get("model") or {}).get("type") != "BPE":
        console.print(f"export: the tokenizer ({type(tok).__name__}) has no GGUF form this writer builds (a BPE "
                      "tokenizer.json); the file holds the weights and the special token ids, no token list")
        _special_ids(w, tok)
        return
    inv = {i: t for t, i in tok.get_vocab().items()}
    special = {a.content for a in getattr(tok, "added_tokens_decoder", {}).values() if a.special}
    added = {a.content for a in getattr(tok, "added_tokens_decoder", {}).values()}
    tokens, types = [], []
    for i in range(vocab):
        t = inv.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if t in special else
                         gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    _special_ids(w, tok)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


def _special_ids(w, tok) -> None:
    """BOS/EOS/UNK/PAD ids (transformers' reader makes them the config's, so generation stops at EOS)."""
    for setter, i in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                      (w.add_unk_token_id, tok.unk_token_id), (w.add_pad_token_id, tok.pad_token_id)):
        if i is not None:
            setter(int(i))


def _write_gguf(plan: ExportPlan, model, tok, source: str, console) -> None:
    import gguf

    arch = GGUF_ARCHS[plan.model_type]

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(f"{Path(str(plan.model.name_or_path)).stem} aligned by lowalign ({plan.root.name})")
        ft = gguf.LlamaFileType.ALL_F32 if plan.type == "f32" else gguf.LlamaFileType[f"MOSTLY_{plan.type.upper()}"]
        w.add_file_type(int(ft))
        if plan.type in QUANTS:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string("lowalign.export", json.dumps(_provenance(plan, source)))  # where it came from
        _hparams(w, model.config, arch)
        _tokenizer_fields(w, plan, tok, _source_dir(source), int(model.config.vocab_size), console)
        tensors = list(gguf_tensors(model, arch))
        with _bar(console, f"tensors ({plan.type})") as bar:
            task = bar.add_task("encode", total=len(tensors))
            for name, data in tensors:
                arr, raw = _encode(data, plan.type)
                w.add_tensor(name, arr, raw_dtype=raw)
                bar.advance(task)
        del tensors
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(plan.out, write)  # beside the destination, renamed over it when complete
