"""Run directory, metrics log, atomic checkpoints (with every RNG state), progress and peak memory.

Passed into algorithms; nothing here knows which algorithm runs.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml


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


class RunDir:
    """``output_dir`` with config.yaml, metrics.jsonl, summary.json, adapters/, checkpoints/."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"

    def write_config(self, cfg_dict: dict) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(cfg_dict, sort_keys=False))

    def log(self, metrics: dict) -> None:
        row = {k: _jsonable(v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def truncate_metrics(self, max_step: int) -> None:
        """Drop rows past ``max_step`` (rows a killed run wrote after its last checkpoint)."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
        atomic_write_text(self.metrics_path, "".join(ln + "\n" for ln in keep))

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln.strip()]

    def write_json(self, name: str, obj: dict) -> None:
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


# ---- checkpoints -------------------------------------------------------------------------------------


class Checkpointer:
    """Checkpoints in ``run/checkpoints/step_NNNNNN``, each written to a temp dir then renamed, with a
    ``latest`` pointer replaced atomically, so a crash never leaves a half-written checkpoint in use."""

    def __init__(self, run_dir: RunDir, keep: int = 2):
        self.root = run_dir.path / "checkpoints"
        self.keep = keep

    def save(self, step: int, bundle, adapters: list[str], state: dict, optimizer=None, scheduler=None,
             extra: dict | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:06d}"
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp_step_{step:06d}_"))
        try:
            for name in adapters:
                bundle.save_adapter(name, tmp / "adapters" / name)
            if len(bundle.heads):
                bundle.save_heads(tmp / "heads.safetensors")
            torch.save({"optimizer": optimizer.state_dict() if optimizer else None,
                        "scheduler": scheduler.state_dict() if scheduler else None,
                        "rng": rng_state(), "extra": extra}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, default=_jsonable))
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
        ptr = self.root / "latest"
        if not ptr.exists():
            return None
        p = self.root / ptr.read_text().strip()
        return p if p.is_dir() else None

    def load(self, path: Path, bundle, adapters: list[str], optimizer=None, scheduler=None) -> dict:
        for name in adapters:
            bundle.load_adapter(name, path / "adapters" / name)
        if (path / "heads.safetensors").exists():
            bundle.load_heads(path / "heads.safetensors")
        blob = torch.load(path / "trainer.pt", weights_only=False)
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
    """Peak GPU memory allocated (CUDA) or peak resident set size of this process (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


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

        self.console = Console(stderr=True)
        self.fields, self.total, self.every, self.t0 = fields, total, every, time.time()
        self.tty = self.console.is_terminal
        self.done = start
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
        info = "  ".join(f"{k.split('/')[-1]} {_jsonable(metrics[k]):.3g}" for k in self.fields if k in metrics)
        self._bar.update(self._task, completed=step, info=info)
        self.done = step
        if not self.tty and (step % self.every == 0 or step == self.total):
            el = time.time() - self.t0
            self.console.print(f"step {step}/{self.total}  {info}  [{el:.0f}s]", highlight=False)
