"""Run directory, metrics log, atomic checkpoints (with every RNG state), progress and peak memory.

Passed into algorithms; nothing here knows which algorithm runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from lowalign.config import ConfigError


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` next to ``path``, then rename over it: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``; a directory already at ``dst`` is renamed aside first and
    removed only once ``src`` is in place."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def _jsonable(v):
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


MARKER = ".lowalign-run"  # written first into every run directory: lowalign writes only where it finds one
HISTORY_PREFIX = "# resumed"  # config.yaml's trailing comment lines: what each resume changed


def is_run_dir(path: Path) -> bool:
    """A directory lowalign created: its marker, or (a run from before markers) config.yaml with metrics or
    checkpoints beside it."""
    p = Path(path)
    return (p / MARKER).is_file() or ((p / "config.yaml").is_file()
                                      and ((p / "metrics.jsonl").is_file() or (p / "checkpoints").is_dir()))


def check_output_dir(path: Path) -> None:
    """Before anything is written: an existing, non-empty ``output_dir`` must be a lowalign run directory, so
    a user's own folder (their config.yaml, notes, results) is never written into. ``ConfigError`` naming
    what is there."""
    p = Path(path)
    if not p.is_dir() or is_run_dir(p):
        return
    have = sorted(x.name + ("/" if x.is_dir() else "") for x in p.iterdir() if x.name != RunLock.NAME)
    if have:
        shown = ", ".join(have[:6]) + (f" and {len(have) - 6} more" if len(have) > 6 else "")
        raise ConfigError(f"output_dir: {p} is not empty ({shown}) and is not a lowalign run directory; "
                          "lowalign does not write into it. Name a new or empty directory.")


class RunDir:
    """``output_dir`` with config.yaml, metrics.jsonl, summary.json, adapters/, checkpoints/ and the marker
    (:data:`MARKER`) that says lowalign made it.

    ``writer=False`` (the ranks after 0 of a multi-process run) reads the same directory and writes nothing.
    ``trackers`` (TensorBoard, wandb: :mod:`lowalign.trackers`) receive every row logged and every rewind."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self.trackers: list = []
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / MARKER).exists():
                atomic_write_text(self.path / MARKER, json.dumps({"created": time.strftime("%Y-%m-%d %H:%M:%S")})
                                  + "\n")
        self.metrics_path = self.path / "metrics.jsonl"

    def write_config(self, cfg_dict: dict, resumed: str | None = None) -> None:
        """config.yaml; ``resumed``: one more history line (what this resume changed), kept below the earlier
        ones as YAML comments."""
        if not self.writer:
            return
        f = self.path / "config.yaml"
        history = [ln for ln in f.read_text().splitlines() if ln.startswith(HISTORY_PREFIX)] if f.exists() else []
        history += [f"{HISTORY_PREFIX} {resumed}"] if resumed else []
        atomic_write_text(f, yaml.safe_dump(cfg_dict, sort_keys=False) + "".join(ln + "\n" for ln in history))

    def write_text(self, name: str, text: str) -> None:
        """``name`` (relative to the run directory), atomically; nothing on a non-writing rank."""
        if self.writer:
            atomic_write_text(self.path / name, text)

    def log(self, metrics: dict) -> None:
        if not self.writer:
            return
        row = {k: _jsonable(v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.trackers and "step" in row:
            from lowalign.trackers import scalars

            for t in self.trackers:
                t.log(int(row["step"]), scalars(row))

    def truncate_metrics(self, max_step: int) -> None:
        """Drop rows past ``max_step`` (rows a killed run wrote after its last checkpoint)."""
        for t in self.trackers if self.writer else []:
            t.rewind(max_step)
        if not self.writer or not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
        atomic_write_text(self.metrics_path, "".join(ln + "\n" for ln in keep))

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln.strip()]

    def write_json(self, name: str, obj: dict) -> None:
        if self.writer:
            atomic_write_text(self.path / name, json.dumps(obj, indent=2, default=_jsonable) + "\n")

    def read_json(self, name: str) -> dict | None:
        p = self.path / name
        return json.loads(p.read_text()) if p.exists() else None


# ---- RNG ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---- state as JSON + safetensors (no code-executing formats) -----------------------------------------


def _to_json_tree(obj, tensors: dict):
    """A JSON-able skeleton of ``obj``; tensors and numpy arrays move into ``tensors`` under numbered keys."""
    if torch.is_tensor(obj):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iub" else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json_tree(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_to_json_tree(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_json_tree(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_to_json_tree(k, tensors), _to_json_tree(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot save a {type(obj).__name__} in a checkpoint (tensors, numbers, strings, containers)")


def _from_json_tree(obj, tensors: dict):
    if isinstance(obj, list):
        return [_from_json_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_from_json_tree(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_from_json_tree(k, tensors): _from_json_tree(v, tensors) for k, v in obj["__items__"]}
    return {k: _from_json_tree(v, tensors) for k, v in obj.items()}


def save_tree(obj, directory: Path, name: str) -> None:
    """``obj`` (nested dicts/lists/tuples of tensors, numpy arrays, numbers, strings) as ``name.json`` plus
    ``name.safetensors``: nothing in it can run code when read."""
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = _to_json_tree(obj, tensors)
    save_file(tensors, str(Path(directory) / f"{name}.safetensors"))
    (Path(directory) / f"{name}.json").write_text(json.dumps(tree))


def load_tree(directory: Path, name: str):
    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / f"{name}.safetensors"))
    return _from_json_tree(json.loads((Path(directory) / f"{name}.json").read_text()), tensors)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (an old, code-executing format) or cannot be written (disk full, ...)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where it stopped and how to resume."""


def interrupted_message(run_dir: Path) -> str:
    """One line for a run stopped by Ctrl-C: the last step done, the checkpoint a resume starts from."""
    p = Path(run_dir)
    if not p.exists():
        return "interrupted before the first step; nothing was written"
    rows = RunDir(p, writer=False).read_metrics()
    done = max((r.get("step", 0) for r in rows), default=0)
    ckpt = Checkpointer(RunDir(p, writer=False)).latest()
    where = (f"checkpoint {ckpt.name} is intact; resume with `lowalign run {p}`" if ckpt else
             f"no checkpoint yet: `lowalign run {p}` starts it again from step 0")
    return f"interrupted after step {done}; {where}"


# ---- one process per run directory ------------------------------------------------------------------


def proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name: [state, ppid, ...]; ``["?"]`` when unreadable
    (no /proc, or the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split() or ["?"]
    except (OSError, IndexError):
        return ["?"]


class RunLock:
    """``run_dir/.lock`` holding the owner's PID, host and start time, created exclusively (O_EXCL). A second
    run on the same directory fails at once naming the holder; a lock whose process is gone (a killed run)
    is taken over with a notice."""

    NAME = ".lock"

    def __init__(self, directory: Path):
        self.path = Path(directory) / self.NAME
        self.held = False

    @staticmethod
    def _alive(info: dict) -> bool:
        import socket

        if info.get("host") != socket.gethostname():
            return True  # another machine's process cannot be checked: assume it runs
        pid = int(info["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # a killed process whose parent died too stays a zombie until init reaps it: dead all the same
        return proc_stat(pid)[0] not in ("Z", "X")

    def holder(self) -> dict | None:
        """The live holder's record, or None when unlocked or the holder is gone."""
        try:
            info = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return None
        return info if self._alive(info) and info.get("pid") != os.getpid() else None

    def check(self) -> None:
        """Raise ``RunLockedError`` naming the holder when a live process owns the directory."""
        info = self.holder()
        if info is not None:
            raise RunLockedError(self.describe(info))

    def describe(self, info: dict) -> str:
        return (f"{self.path.parent} is in use by another run (pid {info['pid']} on {info['host']}, since "
                f"{info.get('started', '?')}); wait for it or pick another output_dir (if that process is "
                f"really gone, delete {self.path})")

    def acquire(self, console=None) -> None:
        import socket

        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = self.holder()
                if info is not None:
                    raise RunLockedError(self.describe(info)) from None
                if console is not None:
                    console.print(f"[yellow]taking over the stale lock of a run that is gone[/] ({self.path})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            self.held = True
            return
        raise RunLockedError(f"could not lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class RunLockedError(RuntimeError):
    """Another live process owns this run directory."""


def check_writable(directory: Path) -> None:
    """Before any work: ``directory`` (or the nearest part of its path that exists) must be a writable
    directory. Raises ``CheckpointError`` naming the path."""
    p = Path(directory).absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CheckpointError(f"output_dir: cannot create {directory}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CheckpointError(f"output_dir: cannot write to {probe} (permission denied)")


# ---- checkpoints -------------------------------------------------------------------------------------


MANIFEST = "manifest.json"
_STEP_NAME = re.compile(r"step_\d{6,}")


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """``manifest.json``: the size and sha256 of every file under ``directory`` (the checkpoint's last file)."""
    files = {str(f.relative_to(directory)): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(directory.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


class Checkpointer:
    """Checkpoints in ``run/checkpoints/step_NNNNNN``, each written to a temp dir then renamed, with a
    ``latest`` pointer replaced atomically, so a crash never leaves a half-written checkpoint in use."""

    def __init__(self, run_dir: RunDir, keep: int = 2):
        self.root = run_dir.path / "checkpoints"
        self.keep = keep
        self.writer = run_dir.writer  # every rank holds the same state: rank 0 writes it

    def save(self, step: int, bundle, adapters: list[str], state: dict, optimizer=None, scheduler=None,
             extra: dict | None = None) -> Path | None:
        if not self.writer:
            return None
        try:
            return self._save(step, bundle, adapters, state, optimizer, scheduler, extra)
        except OSError as e:
            last = self.latest()
            raise CheckpointError(
                f"could not write the checkpoint of step {step} to {self.root}: {e.strerror or e}. "
                + (f"The last good checkpoint, {last.name}, is intact: free space and resume with "
                   f"`lowalign run {self.root.parent}`." if last else "No earlier checkpoint exists.")) from e

    def _save(self, step, bundle, adapters, state, optimizer, scheduler, extra) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp_step_{step:06d}_"))
        try:
            for name in adapters:
                bundle.save_adapter(name, tmp / "adapters" / name)
            if len(bundle.heads):
                bundle.save_heads(tmp / "heads.safetensors")
            save_tree({"optimizer": optimizer.state_dict() if optimizer else None,
                       "scheduler": scheduler.state_dict() if scheduler else None,
                       "rng": rng_state(), "extra": extra}, tmp, "trainer")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, default=_jsonable))
            write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(self.root / "latest", final.name)
        for old in sorted(self.root.glob("step_*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, resolved inside ``checkpoints/`` only: a pointer holding anything but
        a ``step_NNNNNN`` name of this folder (an absolute path, ``../``) is ignored, never followed."""
        ptr = self.root / "latest"
        if not ptr.exists():
            return None
        name = ptr.read_text().strip()
        if not _STEP_NAME.fullmatch(name):
            return None
        p = self.root / name
        return p if p.is_dir() and not p.is_symlink() else None

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, newest first: the one ``latest`` names, then every other ``step_*``
        folder of ``checkpoints/`` by step (a damaged newest one falls back to an older one)."""
        steps = sorted((p for p in self.root.glob("step_*") if _STEP_NAME.fullmatch(p.name) and p.is_dir()
                        and not p.is_symlink()), reverse=True)
        first = self.latest()
        return ([first] if first else []) + [p for p in steps if p != first]

    def resume(self, bundle, adapters: list[str], optimizer=None, scheduler=None,
               console=None) -> tuple[Path, dict] | None:
        """Load the newest intact checkpoint (:meth:`verify`); each damaged one is skipped with a notice naming
        what is wrong. None when there is no checkpoint; ``CheckpointError`` when none is intact."""
        cands = self.candidates()
        problems = []
        for path in cands:
            problem = self.verify(path)
            if problem is None:
                try:
                    return path, self.load(path, bundle, adapters, optimizer, scheduler)
                except CheckpointError:
                    raise
                except Exception as e:  # unreadable although the manifest matched (or an older one without it)
                    problem = f"{type(e).__name__}: {e}"
            problems.append(f"{path.name}: {problem}")
            if console is not None:
                console.print(f"[yellow]checkpoint {path.name} is damaged ({problem}); trying an older one[/]",
                              soft_wrap=True)
        if problems:
            raise CheckpointError(f"no intact checkpoint in {self.root} ({'; '.join(problems)}); start a new run")
        return None

    @staticmethod
    def verify(path: Path) -> str | None:
        """What is wrong with checkpoint ``path`` against its manifest (every file's size and sha256), or None
        when it is intact. A checkpoint from before manifests is checked when it loads."""
        if not (path / "trainer.json").exists() and (path / "trainer.pt").exists():
            return None  # the legacy format (trainer.pt): ``load`` refuses it with the way out
        mf = path / MANIFEST
        if not mf.exists():
            return None
        try:
            files = json.loads(mf.read_text())["files"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            return f"unreadable {MANIFEST} ({e})"
        for rel, want in files.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            size = f.stat().st_size
            if size != want["size"]:
                return f"{rel} has {size} bytes, the manifest says {want['size']}"
            if _sha256(f) != want["sha256"]:
                return f"{rel} does not match its sha256 in the manifest"
        return None

    def load(self, path: Path, bundle, adapters: list[str], optimizer=None, scheduler=None) -> dict:
        for name in adapters:
            bundle.load_adapter(name, path / "adapters" / name)
        if (path / "heads.safetensors").exists():
            bundle.load_heads(path / "heads.safetensors")
        if not (path / "trainer.json").exists() and (path / "trainer.pt").exists():
            raise CheckpointError(
                f"{path} was written by an older lowalign as a pickle (trainer.pt). lowalign never unpickles a "
                "file it may have received from someone else; its adapters in that folder are plain PEFT "
                "safetensors: start a new run from them with lora.init_from=" + str(path / "adapters" / "policy"))
        blob = load_tree(path, "trainer")
        if optimizer is not None and blob["optimizer"] is not None:
            optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None and blob["scheduler"] is not None:
            scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        state = json.loads((path / "state.json").read_text())
        state["extra"] = blob.get("extra")
        return state


# ---- memory and progress -----------------------------------------------------------------------------


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated (CUDA) or peak resident set size of this process (CPU). With
    ``--profile-memory`` the peak counters are reset per phase: :data:`PHASES` keeps the run's maximum."""
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device))
    elif Path("/proc/self/status").exists():
        # VmHWM belongs to this process's address space, new at exec. ru_maxrss is not: Linux carries it over
        # from the parent at fork, so a run started by a large process (a test worker, a notebook kernel)
        # reported the parent's size (measured: 854 MiB for a 673 MiB run)
        peak = proc_status("VmHWM")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = int(rss if sys.platform == "darwin" else rss * 1024)
    return max(peak, PHASES.overall)


def proc_status(key: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS: resident now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def release_cpu_memory() -> None:
    """Hand the C heap's freed pages back to the OS (glibc ``malloc_trim``). A training pass frees gigabytes of
    activations that glibc would otherwise keep mapped, so the next phase (rollout, evaluation) would start
    from the last one's high-water mark: peaks stack instead of taking turns. Measured on SmolLM2-135M
    (benchmarks/RESULTS.md). A no-op where there is no glibc."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
CLEAR_REFS = Path("/proc/self/clear_refs")  # Linux: writing 5 resets the process's peak RSS (VmHWM)


def check_profile_memory(device) -> None:
    """``profile_memory: true`` needs a way to reset the peak between phases: CUDA's counters, or on a CPU
    Linux's ``/proc/self/clear_refs``. Raises a ConfigError naming the field otherwise (before any model
    loads)."""
    if torch.device(device).type == "cpu" and not CLEAR_REFS.exists():
        raise ConfigError(f"profile_memory: on a CPU it needs Linux ({CLEAR_REFS} resets the peak memory "
                          "between phases); run without --profile-memory, or on a CUDA GPU")


class MemoryPhases:
    """Peak memory of each phase of a run (``lowalign run --profile-memory``): load, evaluation, rollout,
    scoring (rewards and no-grad log-probs), reference (DPO's precompute), forward_backward, optimizer.

    ``phase(name)`` resets the device's peak counter on entry and reads it on exit: CUDA
    ``max_memory_allocated``, or on Linux CPUs the process's peak RSS (``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs``). Absolute bytes, not above a baseline. Off unless :meth:`start` enabled it;
    when off, a CPU run still hands the freed heap back to the OS whenever a phase starts (glibc keeps it mapped
    otherwise, and the rollout's peak would sit on top of the last training pass's). One process-wide
    instance, :data:`PHASES`, so code far from the run context (a PPO step, a reference precompute) can mark
    its phases."""

    def __init__(self):
        self.enabled, self.device, self.overall = False, torch.device("cpu"), 0
        self.peaks: dict[str, int] = {}
        self.step: dict[str, int] = {}
        self.after_load = 0

    def start(self, device, enabled: bool) -> None:
        device = torch.device(device)
        if enabled:
            check_profile_memory(device)
        self.__init__()
        self.enabled, self.device = enabled, device

    def stop(self) -> None:
        self.enabled = False

    def _now(self) -> int:
        return int(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda" else proc_status("VmRSS")

    def _peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return proc_status("VmHWM")

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:  # freed heap pages first back to the OS: else the reset peak starts at what earlier phases left
            release_cpu_memory()
            CLEAR_REFS.write_text("5")

    def phase(self, name: str):
        if self.enabled:
            return self._phase(name)
        if self.device.type == "cpu":  # the freed heap back to the OS, also between micro-batches: each one's
            release_cpu_memory()  # holes would otherwise stay resident under the next (measured, RESULTS.md #34)
        return _NULL

    @contextlib.contextmanager
    def _phase(self, name: str):
        self.overall = max(self.overall, self._peak())  # whatever ran between phases
        self._reset()
        try:
            yield
        finally:
            now = self._now()  # before the peak: memory still growing between the two reads stays under the peak
            peak = self._peak()
            self.overall = max(self.overall, peak)
            self.peaks[name] = max(self.peaks.get(name, 0), peak)
            self.step[name] = max(self.step.get(name, 0), peak)
            if name == "load":
                self.after_load = now

    def step_metrics(self) -> dict:
        """``memory/<phase>_mib`` of the phases since the last call (one training step's)."""
        out = {f"memory/{k}_mib": round(v / 2**20, 1) for k, v in self.step.items()}
        self.step = {}
        return out

    def summary(self) -> dict:
        """Each phase's peak over the run and the largest, for ``summary.json``; empty when off."""
        if not self.peaks:
            return {}
        top = max(self.peaks, key=self.peaks.get)
        return {"peak_mib": {k: round(v / 2**20, 1) for k, v in self.peaks.items()},
                "after_load_mib": round(self.after_load / 2**20, 1), "largest_phase": top,
                "device": str(self.device), "measure": "cuda max_memory_allocated" if self.device.type == "cuda"
                else "peak RSS (VmHWM) of the process"}


_NULL = contextlib.nullcontext()
PHASES = MemoryPhases()


class Progress:
    """A rich progress bar showing step, chosen metrics and ETA; plain lines when not on a terminal."""

    def __init__(self, total: int, start: int = 0, fields: tuple[str, ...] = (), desc: str = "train",
                 every: int = 10):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self.console = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")  # torchrun: rank 0 shows it
        self.fields, self.total, self.every, self.t0 = fields, total, every, time.time()
        self.tty = self.console.is_terminal and not self.console.quiet
        self.done = self.start = start
        self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=self.console, disable=not self.tty)
        self._task = self._bar.add_task(desc, total=total, completed=start, info="")

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)

    def update(self, step: int, metrics: dict) -> None:
        info = "  ".join(f"{k.removeprefix('rewards/')} {_jsonable(metrics[k]):.3g}" for k in self.fields
                         if k in metrics)
        rate = (time.time() - self.t0) / max(1, step - self.start)
        self._bar.update(self._task, completed=step, info=f"{info}  {rate:.2f} s/step")
        if not self.tty and (step % self.every == 0 or step == self.total):
            el = time.time() - self.t0
            eta = f", eta {rate * (self.total - step):.0f}s" if step < self.total else ""
            self.console.print(f"step {step}/{self.total}  {info}  [{el:.0f}s, {rate:.2f} s/step{eta}]",
                               highlight=False, soft_wrap=True)  # one line per report in a log file
        self.done = step
