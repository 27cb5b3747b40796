"""lowalign: align language models on one consumer GPU (and, slowly, on a laptop CPU)."""

__version__ = "0.1.0"


def run(config, overrides=None, **kw):
    """Run a recipe: a path to a YAML file, a run directory (resumes it), a dict, or a RunConfig.

    The CLI (`lowalign run`) and notebooks both go through this function. Returns the summary dict.
    """
    from lowalign.api import run as _run

    return _run(config, overrides, **kw)


__all__ = ["run", "__version__"]
