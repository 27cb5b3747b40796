"""lowalign: align language models on one consumer GPU (and, slowly, on a laptop CPU)."""

import os

__version__ = "0.1.0"


def run(config, overrides=None, **kw):
    """Run a recipe: a path to a YAML file, a run directory (resumes it), a dict, or a RunConfig.

    The CLI (`lowalign run`) and notebooks both go through this function. Returns the summary dict.
    """
    from lowalign.api import run as _run

    return _run(config, overrides, **kw)


def complete(model, prompts, **kw):
    """Completions of ``prompts`` from ``model``, optionally with a run's trained adapter
    (``adapter=RUN_DIR``); see :func:`lowalign.api.complete`."""
    from lowalign.api import complete as _complete

    return _complete(model, prompts, **kw)


def write_report(run_dirs, out=None, **kw):
    """PNG plots and ``report.md`` of one run directory or several overlaid; returns the report's path
    (see :func:`lowalign.report.write_report`)."""
    from lowalign.report import write_report as _write

    return _write([run_dirs] if isinstance(run_dirs, (str, os.PathLike)) else run_dirs, out, **kw)


def export(run_dir, out, **kw):
    """A run's adapter merged into its base: a transformers directory (``format="merged"``) or a GGUF file
    (``format="gguf"``, ``quant="q8_0"``, ...); returns the written path (see :func:`lowalign.exporter.export`)."""
    from lowalign.exporter import export as _export

    return _export(run_dir, out, **kw)


__all__ = ["run", "complete", "write_report", "export", "__version__"]
