#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q "$@"
