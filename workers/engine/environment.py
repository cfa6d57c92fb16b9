"""The run's environment as the report records it: versions, device, CPU model, threads,
precision and seed (``report.environment``)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, seed: int, channels_last: bool,
                precision: str, compiled: bool = False) -> dict[str, Any]:
    return {
        "bulwark": _version("bulwark"),
        "torch": torch.__version__,
        "torchattacks": _version("torchattacks"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_model()),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
        "seed": seed,
    }
