#!/usr/bin/env bash
# Idempotent set-up: a project-local virtual environment in .venv with torch pinned first.
# Usage: bash scripts/install.sh        (EXTRAS=dev,bench by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,bench}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.lowalign-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[install] .venv is up to date"
  exit 0
fi
# torch first, exactly the pinned CPU build; everything after is constrained to it.
.venv/bin/python -m pip install -q "$(grep -E '^torch==' constraints.txt)"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, lowalign; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
echo "[install] done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
