"""Metric backends besides ``metrics.jsonl``: TensorBoard event files and Weights & Biases.

``logging.backends: [jsonl, tensorboard, wandb]``. Each tracker receives every metrics row a run logs (its
numbers, by step) and follows a resume the way ``metrics.jsonl`` does: :meth:`rewind` drops what a killed
run logged after its last checkpoint (TensorBoard purges those events; wandb cannot un-log, so a resumed
run continues in the same wandb run id and later steps win). Neither package is required: asking for one
that is not installed is a config error before any model loads (:func:`check_backends`).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_backends(lc) -> None:
    """Every backend in ``lc.backends`` (a :class:`lowalign.config.LoggingConfig`) can be imported."""
    from lowalign.config import ConfigError

    for i, b in enumerate(lc.backends):
        pkg = PACKAGES.get(b)
        if pkg is not None and importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"logging.backends[{i}]: '{b}' needs the {pkg} package (pip install {pkg}, or "
                              f"pip install 'lowalign[logging]'); or leave it out")


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row, without ``step``."""
    out = {}
    for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class TensorBoardTracker:
    """``<run>/tensorboard`` event files through ``torch.utils.tensorboard``; flushed after every row, so a
    killed run loses nothing it logged."""

    def __init__(self, run_path: Path):
        self.dir = Path(run_path) / "tensorboard"
        self.writer = None

    def rewind(self, step: int) -> None:
        """Keep events up to ``step``: a new writer whose ``purge_step`` hides later ones from readers."""
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self.writer = SummaryWriter(str(self.dir), purge_step=step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            self.rewind(0)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def finish(self, summary: dict) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    """A Weights & Biases run in ``<run>/wandb`` (offline by default: nothing leaves the machine until
    ``wandb sync``). The run id is kept in ``<run>/wandb_id.txt`` so a resumed run continues the same one."""

    def __init__(self, run_path: Path, config: dict, project: str, mode: str):
        import secrets

        import wandb

        run_path = Path(run_path)
        id_file = run_path / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, dir=str(run_path), id=run_id, resume="allow", mode=mode,
                              name=run_path.name, config=config)

    def rewind(self, step: int) -> None:
        pass  # wandb keeps what it logged; the resumed run logs the same steps again

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict) -> None:
        for part in ("baseline", "final"):
            self.run.summary.update({f"{part}/{k}": v for k, v in scalars(summary.get(part) or {}).items()})
        self.run.summary.update(scalars(summary))
        self.close()

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_trackers(lc, run_path: Path, config: dict) -> list:
    """The trackers of ``lc.backends`` (``jsonl`` is the run directory's own ``metrics.jsonl``)."""
    return [FACTORIES[b](lc, Path(run_path), config) for b in lc.backends if b in FACTORIES]


FACTORIES = {
    "tensorboard": lambda lc, path, config: TensorBoardTracker(path),
    "wandb": lambda lc, path, config: WandbTracker(path, config, lc.wandb_project, lc.wandb_mode),
}
