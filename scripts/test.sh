#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
VENV=${VENV:-.venv}
# two processes (one per core here): a test file stays in one process (its stack fixtures are
# per module), each process has its own ports, folders and PostgreSQL database;
# BULWARK_TEST_PROCESSES=0 runs everything in this one. The slowest tests are listed at the end.
exec "$VENV/bin/python" -m pytest -q -n "${BULWARK_TEST_PROCESSES:-2}" --dist loadfile \
  --durations=15 "$@"
