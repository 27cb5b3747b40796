import importlib.util
import subprocess
import sys

from lowalign.cli import main

from .algorithms.helpers import REPO


def test_ls_lists_recipes_with_descriptions(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "grpo_tiny" in out and "GRPO with LoRA on builtin:tiny" in out


def test_cp_copies_and_reports_unknown(tmp_path, capsys):
    assert main(["cp", "grpo_tiny", str(tmp_path)]) == 0
    assert (tmp_path / "grpo_tiny.yaml").read_text() == (REPO / "recipes" / "grpo_tiny.yaml").read_text()
    assert main(["cp", "grpo_tinny", str(tmp_path)]) == 2
    assert "no recipe named 'grpo_tinny'" in capsys.readouterr().err


def test_validate_ok_and_bad_override(capsys):
    assert main(["validate", "grpo_tiny"]) == 0
    assert main(["validate", "grpo_tiny", "train.beta=high"]) == 2
    assert "train.beta: expected a number" in capsys.readouterr().err


def test_kernels_ship_inside_the_lowalign_namespace():
    import lowalign.kernels.logprobs as k

    assert k.__file__.endswith("kernels/logprobs/__init__.py")
    # outside the repo root lowalign adds no top-level module called `kernels` (transformers probes it; the
    # package index's `kernels`, which transformers >= 5.25 requires, may be installed and is what it finds)
    code = ("import importlib.util, lowalign.kernels; s = importlib.util.find_spec('kernels'); "
            "print(s.origin if s is not None else None)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert p.returncode == 0, p.stderr
    origin = p.stdout.strip()
    assert origin == "None" or "site-packages" in origin, origin  # never the repository's kernels/
    assert importlib.util.find_spec("lowalign.kernels.logprobs.reference") is not None
