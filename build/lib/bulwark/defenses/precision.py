"""Mixed precision for every forward in training, evaluation and certification."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
