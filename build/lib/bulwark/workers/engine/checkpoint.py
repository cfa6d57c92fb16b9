"""Atomic checkpoints and weights files.

A checkpoint (``checkpoint.pt``) holds only tensors, numbers, strings, lists and dicts and is
read back with ``torch.load(weights_only=True)``: no arbitrary object is ever unpickled. It is
written to a temporary file, fsynced and moved into place with ``os.replace``, so a crash
mid-write leaves the previous checkpoint intact. Final weights go to safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bulwark.contract.files import atomic_write


class _Recording:
    """A file that remembers the OSError its ``write`` raised: torch.save turns that into an
    opaque RuntimeError ("unexpected pos ..."), and a full disk must say so."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def _torch_save(state: dict[str, Any], f) -> None:
    recording = _Recording(f)
    try:
        torch.save(state, recording)
    except RuntimeError as e:
        if recording.error is not None:  # the real cause: ENOSPC, EDQUOT, EROFS, EIO ...
            raise recording.error from e
        raise


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda f: _torch_save(state, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata or {})  # its mode: the process's umask
    os.replace(tmp, path)


def load_weights(path: Path, model: nn.Module, device="cpu") -> nn.Module:
    """Load safetensors weights (never a pickle) into ``model``; all keys must match."""
    model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    return model


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file (Bulwark writes arch, classes, shape, mean, std)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def check_normalization(meta: dict[str, str], mean, std, *, where: str) -> None:
    """Refuse weights trained behind another input normalization than the model they are
    loaded into (the constants are not in the state dict, so loading alone cannot tell): the
    same weights on other inputs compute another function. Files that record none pass."""
    try:
        had_mean, had_std = json.loads(meta["mean"]), json.loads(meta["std"])
        close = all(abs(float(a) - float(b)) < 1e-6
                    for a, b in zip([*had_mean, *had_std], [*mean, *std], strict=True))
    except (KeyError, ValueError, TypeError):  # none recorded, or not by Bulwark: nothing to hold
        return
    if not close:
        plain = all(float(m) == 0.0 for m in had_mean) and all(float(s) == 1.0 for s in had_std)
        raise ValueError(
            f"{where}: trained on inputs normalized with mean {had_mean}, std {had_std}, but "
            f"this job's model uses mean {list(mean)}, std {list(std)}; set "
            f"model.normalization: {'none' if plain else 'dataset'} to evaluate them as trained")


def load_model(path: str | Path, *, device: str = "cpu", mean=None, std=None) -> nn.Module:
    """A plain ``nn.Module`` (in eval mode) rebuilt from a Bulwark weights file: the
    architecture, classes and input shape come from its metadata, then the safetensors tensors
    are loaded (never a pickle). It maps [0, 1] images to logits (normalization inside).
    ``mean``/``std`` are needed only for weights written before they were recorded."""
    from bulwark.workers.engine.models import build_model

    path = Path(path)
    meta = weights_metadata(path)
    missing = [k for k in ("arch", "num_classes", "in_channels", "image_size") if k not in meta]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} in the file's metadata; it was not "
                         "written by Bulwark (build the model yourself and use load_weights)")
    if mean is None or std is None:
        if "mean" not in meta or "std" not in meta:
            raise ValueError(f"{path}: the file records no input mean/std; pass mean= and std=")
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    model = build_model(meta["arch"], num_classes=int(meta["num_classes"]),
                        in_channels=int(meta["in_channels"]),
                        image_size=int(meta["image_size"]), mean=mean, std=std,
                        depth=int(meta.get("depth", 28)),
                        widen_factor=int(meta.get("widen_factor", 10)))
    load_weights(path, model, device=device)
    return model.to(device).eval()
