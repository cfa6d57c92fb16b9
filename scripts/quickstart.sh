#!/usr/bin/env bash
# Install (idempotent) and run the quick-start job locally: FGSM + ELLE on MNIST, no server.
# Usage: scripts/quickstart.sh [SPEC] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
SPEC=${1:-examples/mnist-fgsm-elle.yaml}
OUT=${2:-runs/quickstart}
VENV=${VENV:-.venv}
exec "$VENV/bin/bulwark" run "$SPEC" --out "$OUT" --force
