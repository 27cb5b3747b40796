"""lowalign.kernels: fused ops with a plain-PyTorch reference (the spec and CPU path) and Triton kernels.

This folder ships as ``lowalign.kernels``. Run from the repository root (``python -m``, a notebook), the
root is on ``sys.path`` and ``import kernels`` finds this folder, which must not shadow the package of that
name on the package index (transformers and bitsandbytes probe for it). Imported under that top-level name,
this module steps aside: it loads the real ``kernels`` from the rest of ``sys.path`` when one is installed,
and otherwise turns itself into what Python makes of a folder without ``__init__.py`` (an empty namespace:
no ``__file__``, no submodules), which transformers' probe reads as "not installed".
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds after this runs
        _spec.loader.exec_module(_real)
    else:
        __path__ = []  # noqa: F811  (no submodules: nothing of lowalign's is reachable as `kernels.*`)
        for _name in ("__file__", "importlib", "os", "sys", "_root", "_spec"):
            globals().pop(_name, None)
        globals().pop("_name", None)
