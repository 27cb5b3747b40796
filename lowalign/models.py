"""What lowalign needs to know about a model before loading its weights: from ``config.json`` alone.

* the architecture loads as a causal LM (a skeleton on the meta device: no weights, no memory);
* ``lora.target_modules``: ``auto`` resolves to every linear projection of the transformer blocks (the
  names differ per architecture: Llama's q/k/v/o/gate/up/down_proj, Phi-3's qkv_proj/gate_up_proj, GPT-2's
  c_attn/c_proj/c_fc), never the output head unless named; explicit names that match nothing are an error
  naming the modules the model has;
* the tokenizer fits the embedding (token ids below the model's vocabulary size).

Runs in ``lowalign validate`` and at the start of ``lowalign run`` before any directory is created; the
bundle uses the same resolution on the loaded model.

Model loading lives here: where a name points (:func:`resolve_path`: builtin, local directory, hub id, a GGUF
file or packaged GGUF converted once into the cache by :mod:`lowalign.gguf_source`), its config and its
tokenizer (:func:`load_tokenizer`). The bundle loads weights from what :func:`resolve_path` returns.
"""

from __future__ import annotations

from pathlib import Path

from lowalign.config import AUTO, ConfigError, nearest_listing


def linear_module_names(model) -> list[str]:
    """Sorted unique last names of the linear layers (``nn.Linear``, GPT-2's ``Conv1D``, bitsandbytes'
    4/8-bit linears) of ``model``, the output head excluded."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    head_names = [n for n, m in model.named_modules() if m is head]
    names = set()
    for name, mod in model.named_modules():
        if not name or any(name == h or name.startswith(h + ".") for h in head_names) or ".lora_" in name:
            continue
        if isinstance(mod, (torch.nn.Linear, Conv1D)) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            if name.endswith(".base_layer"):  # inside a peft wrapper: the wrapper's name is the module's
                name = name.removesuffix(".base_layer")
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def all_module_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}


def resolve_target_modules(model, requested, where: str = "lora.target_modules") -> list[str]:
    """``auto`` -> the model's linear projections; a list -> checked: every name must match a module."""
    linear = linear_module_names(model)
    if requested == AUTO:
        if not linear:
            raise ConfigError(f"{where}: {type(model).__name__} has no linear layers to put LoRA on")
        return linear
    if isinstance(requested, str):
        raise ConfigError(f"{where}: give 'auto' or a list of module names, got {requested!r}")
    have = all_module_names(model)
    head = model.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    missing = [t for t in requested if t not in have]
    if missing:
        raise ConfigError(f"{where}: {missing} match no module of {type(model).__name__}; its linear modules "
                          f"are {linear}{' (output head: ' + ', '.join(sorted(head_names)) + ')' if head_names else ''}"
                          ". Use 'auto' for all of them.")
    return list(requested)


def gguf_path(name_or_path: str, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a model source names (a ``.gguf`` path, a directory plus ``gguf_file``, or a packaged
    model), without converting it; None for any other source. A named file that is missing is an error."""
    from lowalign.gguf_source import PACKAGED_PREFIX, packaged_gguf

    if name_or_path.startswith(PACKAGED_PREFIX):
        return packaged_gguf(name_or_path)
    if gguf_file:
        f = Path(name_or_path).expanduser() / gguf_file
        if not f.is_file():
            raise ConfigError(f"model.gguf_file: {f} not found"
                              + (f" (the directory has {sorted(p.name for p in f.parent.glob('*.gguf'))})"
                                 if f.parent.is_dir() else ""))
        return f
    if name_or_path.lower().endswith(".gguf"):
        f = Path(name_or_path).expanduser()
        if not f.is_file():
            raise ConfigError(f"model.name_or_path: GGUF file not found: {f}")
        return f
    return None


def resolve_path(name_or_path: str, gguf_file: str | None = None, console=None) -> str:
    """What ``from_pretrained`` loads for a model source: the builtin's directory, a GGUF's converted
    directory (converted now if this content never was), or the name as given (local directory, hub id)."""
    from lowalign.tiny import resolve_builtin

    builtin = resolve_builtin(name_or_path)
    if builtin is not None:
        if not (builtin / "config.json").exists():
            raise ConfigError(f"model.name_or_path: built-in weights missing at {builtin} "
                              "(rebuild with scripts/build_tiny.py)")
        return str(builtin)
    f = gguf_path(name_or_path, gguf_file)
    if f is not None:
        from lowalign.gguf_source import convert

        return str(convert(f, console))
    if name_or_path not in _CHECKED:  # the tokenizer and the bundle resolve one source: one check (and hub probe)
        check_source(name_or_path)
        _CHECKED.add(name_or_path)
    return name_or_path


_CHECKED: set[str] = set()
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within ``timeout`` seconds (never when ``HF_HUB_OFFLINE`` is set);
    the DNS lookup runs in a thread so a dead resolver cannot stall the check either."""
    import os
    import socket
    import threading

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    ok = []

    def probe():
        try:
            socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443),
                                     timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def check_source(name: str) -> None:
    """Before anything is created: a local model directory holds a config and weights; a hub id is in the local
    cache or the hub is reachable (a name that can only be a path was checked by the config layer).
    ``ConfigError`` naming what is wrong."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"model.name_or_path: {p} is a file; name a model directory (config.json, weights, "
                              "tokenizer) or a .gguf file")
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {p} has no config.json (not a model directory)")
        if not any((p / w).is_file() for w in _WEIGHT_FILES) and not list(p.glob("*.safetensors")):
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            raise ConfigError(f"model.name_or_path: {p} has a config.json but no weights (model.safetensors, "
                              "its sharded index, or pytorch_model.bin)"
                              + (f"; it holds {ggufs}: set model.gguf_file" if ggufs else ""))
        return
    near = nearest_listing(name)  # a hub id may be a mistyped relative path (models/my-modle)
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id
        raise ConfigError(f"model.name_or_path: '{name}' is neither a local directory nor a hub id{near}") from None
    if not cached and not hub_reachable():
        raise ConfigError(f"model.name_or_path: '{name}' is not a local directory{near}, not in the local Hugging "
                          f"Face cache ({HF_HUB_CACHE}), and the hub cannot be reached (offline): download it "
                          "where there is a network, or name a local directory or .gguf file")


def safetensors_reader(path: str):
    """``name -> float32 tensor`` over a model's safetensors weights (one file or a sharded index) in a local
    directory or the local Hugging Face cache, opened lazily; None when it has none (pytorch_model.bin only,
    or nothing cached). LoftQ reads the full-precision weights here."""
    import json

    d = Path(path).expanduser()
    if not d.is_dir():
        try:
            from huggingface_hub import snapshot_download

            d = Path(snapshot_download(path, local_files_only=True,
                                       allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
        except Exception:
            return None
    index, one = d / "model.safetensors.index.json", d / "model.safetensors"
    headers: dict = {}  # file -> its parsed header, read once
    if index.is_file():
        where = {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    elif one.is_file():
        headers[one] = _safetensors_header(one)
        where = {k: one for k in headers[one][1] if k != "__metadata__"}
    else:
        return None

    def read(name: str):
        f = where.get(name)
        if f is None:
            return None
        if f not in headers:
            headers[f] = _safetensors_header(f)
        start, meta = headers[f]
        return _read_tensor(f, start, meta[name]).float()

    return read


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _safetensors_header(f: Path) -> tuple[int, dict]:
    """(where the data starts, ``{name: {"dtype", "shape", "data_offsets"}}``) of safetensors file ``f``."""
    import json
    import struct

    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return 8 + n, json.loads(fh.read(n))


def _read_tensor(f: Path, start: int, meta: dict):
    """One tensor of a safetensors file, read into memory of its own with plain file reads, not through a
    memory map: every page a map reads stays in the process's resident set while the map lives (405 MiB of
    SmolLM2's block weights during a GPTQ calibration), where a read's buffer is freed with the tensor."""
    import torch

    begin, end = meta["data_offsets"]
    buf = bytearray(end - begin)
    with open(f, "rb") as fh:
        fh.seek(start + begin)
        if fh.readinto(buf) != len(buf):
            raise ValueError(f"{f}: truncated (tensor data ends past the end of the file)")
    dtype = getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]])
    return (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)).reshape(meta["shape"])


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer class a local directory declares (tokenizer_config.json) wins; else AutoTokenizer.
    transformers 5 may otherwise substitute the model type's default class (an empty Qwen2Tokenizer for a
    byte tokenizer, or a sentencepiece Llama tokenizer for a Mistral directory that holds none)."""
    import json

    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    cfg_file = Path(path) / "tokenizer_config.json"
    if cfg_file.exists():
        declared = json.loads(cfg_file.read_text()).get("tokenizer_class")
        cls = tokenizer_class_from_name(declared) if declared else None
        if cls is not None:
            return cls.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _local_dir(name_or_path: str, gguf_file: str | None = None) -> Path | None:
    """The directory a builtin name, a local path or an already converted GGUF names, or None (a hub id, a
    GGUF not converted yet)."""
    from lowalign.tiny import resolve_builtin

    f = gguf_path(name_or_path, gguf_file)
    if f is not None:
        from lowalign.gguf_source import cached_dir, is_converted

        d = cached_dir(f)
        return d if is_converted(d) else None
    local = Path(resolve_builtin(name_or_path) or Path(name_or_path).expanduser())
    return local if local.is_dir() else None


def read_config(name_or_path: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """The model's config from its config.json: a local dir, builtin, or the local hub cache (validation never
    waits on the network); for a GGUF, from its header (cached by content, converted or not). None for a hub
    id not cached yet: the same checks then run on the loaded model (``ModelBundle.add_adapter`` resolves the
    LoRA targets the same way)."""
    from transformers import AutoConfig

    f = gguf_path(name_or_path, gguf_file)
    if f is not None:
        from lowalign.gguf_source import header_config

        return header_config(f)
    local = _local_dir(name_or_path)
    if local is not None:
        if not (local / "config.json").exists():
            raise ConfigError(f"model.name_or_path: {local} has no config.json (not a model directory)")
        try:
            return AutoConfig.from_pretrained(str(local), trust_remote_code=trust_remote_code)
        except (ValueError, KeyError, OSError) as e:
            raise ConfigError(f"model.name_or_path: cannot read {local}/config.json: {e}") from e
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        return None


def text_sizes(config) -> tuple[int, int, int, int, int]:
    """(hidden, attention width = heads x head_dim, key/value width, MLP width, layers) of a model config's text
    part, with the usual fallbacks (head_dim = hidden / heads, kv heads = heads, MLP 4 x hidden)."""
    tc = config.get_text_config()
    hidden = tc.hidden_size
    heads = getattr(tc, "num_attention_heads", 1)
    head_dim = getattr(tc, "head_dim", None) or hidden // heads
    kv = (getattr(tc, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(tc, "intermediate_size", None) or 4 * hidden
    layers = getattr(tc, "num_hidden_layers", None) or getattr(tc, "n_layer", 1)
    return hidden, heads * head_dim, kv, inter, layers


def skeleton(config, trust_remote_code: bool = False):
    """The causal LM built from ``config`` on the meta device: module names and shapes, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ConfigError(f"model.name_or_path: architecture '{config.model_type}' does not load as a causal "
                          f"LM: {e}") from e


def check_model(cfg) -> None:
    """The config.json checks of a run config; resolves ``cfg.lora.target_modules`` in place. Skipped when
    the model's config is out of reach (a hub id not in the local cache): the bundle checks on load."""
    m = cfg.model
    if m.gguf_file and gguf_path(m.name_or_path) is not None:
        raise ConfigError(f"model.gguf_file: names a file inside a model directory, but model.name_or_path "
                          f"'{m.name_or_path}' is a GGUF already")
    config = read_config(m.name_or_path, m.trust_remote_code, m.gguf_file)
    if config is None:
        return
    model = skeleton(config, m.trust_remote_code)
    cfg.lora.target_modules = resolve_target_modules(model, cfg.lora.target_modules)
    _check_tokenizer(m, model.get_input_embeddings().num_embeddings)


def _check_tokenizer(m, vocab: int) -> None:
    f = gguf_path(m.name_or_path, m.gguf_file)
    if f is not None:  # the header's token list, converted or not
        from lowalign.gguf_source import read_header

        n, what = read_header(f).vocab_size, f"{f.name}'s tokenizer"
    else:
        local = _local_dir(m.name_or_path)
        if local is None:
            return
        n, what = len(load_tokenizer(str(local), m.trust_remote_code)), "the tokenizer"
    if n > vocab:
        raise ConfigError(f"model.name_or_path: {what} has {n} tokens but the model's embedding "
                          f"only {vocab}: ids past {vocab - 1} would index out of range")


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja")
_SAMPLE = 1 << 20


def model_directory(name_or_path: str) -> Path | None:
    """The local directory holding a model's files: itself, the builtin's, or a hub id's cached snapshot."""
    local = _local_dir(name_or_path)
    if local is not None:
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not cached (or not a hub id): nothing local to fingerprint
        return None


def _file_digest(f: Path) -> str:
    """Size, mtime and a hash of a weight file's safetensors header and its first and last MiB: re-saving
    different weights at the same path changes it, without reading gigabytes."""
    import hashlib

    st = f.stat()
    h = hashlib.sha256(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(f, "rb") as fh:
        head = fh.read(8)
        h.update(head)
        if f.suffix == ".safetensors" and len(head) == 8:
            h.update(fh.read(min(int.from_bytes(head, "little"), 100 << 20)))  # the JSON header
        h.update(fh.read(_SAMPLE))
        fh.seek(max(0, st.st_size - _SAMPLE))
        h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def fingerprint(name_or_path: str | None, gguf_file: str | None = None) -> str:
    """A digest of a model's (or adapter's) weight files and tokenizer files, for caches keyed by content:
    the same path holding different weights gives a different fingerprint (a GGUF: its bytes' sha256)."""
    import hashlib

    if name_or_path is None:
        return "none"
    f = gguf_path(name_or_path, gguf_file)
    if f is not None:
        from lowalign.gguf_source import content_key

        return hashlib.sha256(f"gguf:{content_key(f)}".encode()).hexdigest()[:24]
    d = model_directory(name_or_path)
    h = hashlib.sha256(str(name_or_path).encode())
    if d is None:
        return h.hexdigest()[:16] + "-unresolved"
    for f in sorted(p for p in d.iterdir() if p.is_file()):
        if f.suffix in _WEIGHT_SUFFIXES:
            h.update(_file_digest(f).encode())
        elif f.name in _TOKENIZER_FILES or f.name == "config.json" or f.name == "adapter_config.json":
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:24]
