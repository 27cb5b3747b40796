import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args, timeout=600, env=None, check=True):
    """Run the real CLI in a subprocess (the way users do)."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "lowalign", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=e, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"lowalign {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def metrics(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())
