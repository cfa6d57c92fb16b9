"""The `bulwark` command as the tests run it: this interpreter's module, so that a test always
runs the CLI of the environment it runs in."""

from __future__ import annotations

import sys

CLI = [sys.executable, "-m", "bulwark.workers.client.cli"]
