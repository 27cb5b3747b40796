#!/usr/bin/env bash
# The test command: install (idempotent), lint, then the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/pytest -q "$@"
