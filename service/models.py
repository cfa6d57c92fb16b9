"""Uploaded model weights: safetensors only (never a pickle), architecture from an allow-list.

The upload is copied to a temporary file, its safetensors header is parsed and checked (a JSON
header of tensors whose byte ranges tile the data section exactly), and only then moved into
the artifact store and registered.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Any, BinaryIO

from service.artifacts import model_path, sha256_file
from service.db import new_id

ALLOWED_ARCHS = ("small_cnn", "preact_resnet18", "wide_resnet")
_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}


class ModelRejected(ValueError):
    def __init__(self, msg: str, status: int = 422):
        super().__init__(msg)
        self.status = status


def check_safetensors(path: str) -> dict[str, Any]:
    """Parse and validate a safetensors file's header; return {name: {dtype, shape}}."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelRejected("not a safetensors file: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or 8 + n > size or n > 100 * 1024 * 1024:
            raise ModelRejected("not a safetensors file: bad header length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelRejected("not a safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise ModelRejected("not a safetensors file: the header is not a JSON object")
    header.pop("__metadata__", None)
    spans, tensors = [], {}
    for name, t in header.items():
        if not (isinstance(t, dict) and t.get("dtype") in _DTYPES
                and isinstance(t.get("shape"), list) and isinstance(t.get("data_offsets"), list)
                and len(t["data_offsets"]) == 2):
            raise ModelRejected(f"not a safetensors file: bad entry for tensor {name!r}")
        spans.append(tuple(t["data_offsets"]))
        tensors[name] = {"dtype": t["dtype"], "shape": t["shape"]}
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos or end < begin:
            raise ModelRejected("not a safetensors file: tensor byte ranges do not tile")
        pos = end
    if 8 + n + pos != size:
        raise ModelRejected("not a safetensors file: the data section has the wrong length")
    if not tensors:
        raise ModelRejected("the safetensors file holds no tensors")
    return tensors


def store_upload(store, settings, tenant_id: str, stream: BinaryIO, *, arch: str,
                 meta: dict[str, Any]):
    if arch not in ALLOWED_ARCHS:
        raise ModelRejected(f"arch must be one of {list(ALLOWED_ARCHS)}, got {arch!r}")
    model_id = new_id()
    dest = model_path(settings, tenant_id, model_id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as out:
            copied = 0
            while block := stream.read(1 << 20):
                copied += len(block)
                if copied > settings.max_upload_bytes:
                    raise ModelRejected(f"upload larger than {settings.max_upload_bytes} bytes",
                                        413)
                out.write(block)
        tensors = check_safetensors(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the workers (maybe another user) read it
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    meta = {**meta, "tensors": len(tensors)}
    return store.add_model(tenant_id, arch=arch, meta=meta, path=str(dest),
                           sha256=sha256_file(dest), size=dest.stat().st_size,
                           model_id=model_id)


