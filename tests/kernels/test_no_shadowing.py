"""The repository's top-level kernels/ folder never shadows the `kernels` package of the package index when
a command runs from the repository root (where `python -m` and notebooks put the root on sys.path)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code, env=None):
    import os

    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_import_kernels_from_the_root_finds_the_real_package(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'index'\ndef get_kernel(*a, **k):\n    return 'kernel'\n")
    code = ("import sys; assert sys.path[0] == '', sys.path[:2]\n"  # the repository root comes first
            "from kernels import get_kernel; import kernels; print(kernels.MARK, get_kernel(), kernels.__file__)\n"
            "import lowalign.kernels.logprobs")
    p = _run(code, {"PYTHONPATH": str(tmp_path / "site")})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[:2] == ["index", "kernel"] and str(fake) in p.stdout


def test_without_the_package_the_folder_reads_as_not_installed():
    """No `kernels` installed: from the root, the folder looks like a bare namespace (what Python makes of a
    folder without __init__.py): transformers' availability probe says no, and a model imports."""
    p = _run("import importlib.util, sys\n"
             "sys.path = [s for s in sys.path if s != '']\n"
             "if importlib.util.find_spec('kernels') is not None: print('INSTALLED'); raise SystemExit\n"
             "sys.path.insert(0, '')\n"
             "from transformers.utils.import_utils import is_kernels_available\n"
             "from transformers import GPT2LMHeadModel  # imports transformers' hub-kernel probe\n"
             "import kernels\n"
             "print(is_kernels_available(), getattr(kernels, '__file__', None), list(kernels.__path__))\n"
             "try:\n    from kernels import get_kernel\n"
             "except ImportError as e:\n    print('ImportError', 'get_kernel' in str(e))\n")
    assert p.returncode == 0, p.stderr
    if p.stdout.strip() != "INSTALLED":
        assert p.stdout.split() == ["False", "None", "[]", "ImportError", "True"], p.stdout


def test_the_suite_never_registers_its_kernels_tests_as_kernels():
    """pytest names this folder's modules tests.kernels.*: a test folder registered as top-level `kernels` (what
    pytest does for a folder of tests outside a package) made every transformers import in the worker that had
    collected it fail with "cannot import name 'CUDAProperties' from 'kernels'", once transformers required the
    package index's `kernels`."""
    import importlib.util

    assert __name__ == "tests.kernels.test_no_shadowing", __name__
    here = Path(__file__).resolve().parent
    mod = sys.modules.get("kernels")
    assert mod is None or Path(getattr(mod, "__file__", None) or "/").resolve().parent != here, mod
    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin is None or Path(spec.origin).resolve().parent != here, spec
