#!/usr/bin/env bash
# Create .venv (if absent) and install Bulwark with its test tools.
# Usage: scripts/install.sh            (VENV=path to choose another environment)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
$PIP install --quiet -c constraints.txt -e ".[dev]"
# Debian's Chromium for the browser test of /docs (Playwright drives the system browser and
# never downloads one). Installed only where it is missing and apt is ours to use.
if [ -z "${BULWARK_NO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "note: could not install chromium; the browser test will skip" >&2
fi
"$VENV/bin/python" -c "import torch, torchattacks; print('bulwark env ready: torch', torch.__version__, '| torchattacks', torchattacks.__version__)"
