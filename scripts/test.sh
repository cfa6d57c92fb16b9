#!/usr/bin/env bash
# Install (idempotent) and run the test suite on CPU.
#   scripts/test.sh            everything (the README's test command and CI's)
#   scripts/test.sh --fast     the fast lane: contract, engine, attacks, defenses, store, reports
#                              (no service stack, no end-to-end training; a few minutes)
# Further arguments go to pytest (a file, -k EXPR, -x ...).
set -euo pipefail
cd "$(dirname "$0")/.."
LANE=()
if [ "${1:-}" = "--fast" ]; then
  shift
  LANE=(-m "not slow and not stack and not training")
fi
scripts/install.sh
VENV=${VENV:-.venv}
# two processes (one per core here): a test file stays in one process (its stack fixtures are
# per module), each process has its own ports, folders and PostgreSQL database;
# BULWARK_TEST_PROCESSES=0 runs everything in this one. The slowest tests are listed at the end.
exec "$VENV/bin/python" -m pytest -q -n "${BULWARK_TEST_PROCESSES:-2}" --dist loadfile \
  --durations=15 "${LANE[@]}" "$@"
