"""Every tutorial notebook runs top to bottom on the CPU (its ``FAST = True`` settings) and is stored without
outputs. Each runs in its own kernel with a temporary working directory, where it writes its runs."""

import json
import shutil
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXPECTED = {"quickstart", "preferences", "gradient_free", "bring_your_own", "ppo", "real_model"}


def test_every_tutorial_is_there_and_stored_without_outputs():
    assert {p.stem for p in NOTEBOOKS} >= EXPECTED
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code, p.name
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
            f"{p.name} is stored with outputs: clear them (Jupyter: Edit > Clear All Outputs)"
        assert "FAST = True" in "".join(code[0]["source"]), f"{p.name}: the first code cell sets FAST"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # kernel python3: jupyter_client starts it with this interpreter (the project's .venv), with this process's
    # environment (conftest.py: one OpenMP thread)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert pngs, f"{path.name} shows no plot"
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
