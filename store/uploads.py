"""Uploads: model weights (safetensors only, never a pickle; architecture from an allow-list)
and datasets (``.npz`` read with numpy alone, ``allow_pickle=False``).

An upload is copied to a temporary file (bytes counted against the cap), checked — a
safetensors header of tensors whose declared shapes fill their byte ranges exactly and whose
ranges tile the data section (so no shape can claim more elements than the file holds, and the
upload cap bounds them all); an npz read as the worker will read it, labels below MAX_CLASSES —
and only then moved into the tenant's artifact folder and registered.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from bulwark.contract.files import new_file
from bulwark.contract.spec import ARCHS
from bulwark.store.artifacts import dataset_key, dataset_path, model_key, model_path, sha256_file
from bulwark.store.db import new_id
from bulwark.store.storage import Artifacts

ALLOWED_ARCHS = ARCHS
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
           "U8": 1, "BOOL": 1}  # bytes per element
MAX_DIMS = 8


class UploadRejected(ValueError):
    def __init__(self, msg: str, status: int = 422):
        super().__init__(msg)
        self.status = status


def check_safetensors(path: str) -> dict[str, Any]:
    """Parse and validate a safetensors file's header; return {name: {dtype, shape}}."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UploadRejected("not a safetensors file: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or 8 + n > size or n > 100 * 1024 * 1024:
            raise UploadRejected("not a safetensors file: bad header length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UploadRejected("not a safetensors file: the header is not JSON") from None
        except RecursionError:
            raise UploadRejected("not a safetensors file: the header is nested too deeply") \
                from None
    if not isinstance(header, dict):
        raise UploadRejected("not a safetensors file: the header is not a JSON object")
    header.pop("__metadata__", None)
    spans, tensors = [], {}
    for name, t in header.items():
        if not (isinstance(t, dict) and t.get("dtype") in _DTYPES
                and isinstance(t.get("shape"), list) and isinstance(t.get("data_offsets"), list)
                and len(t["data_offsets"]) == 2):
            raise UploadRejected(f"not a safetensors file: bad entry for tensor {name!r}")
        shape, span = t["shape"], t["data_offsets"]
        if len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise UploadRejected(f"tensor {name!r}: shape {str(shape)[:100]} must be at most "
                                 f"{MAX_DIMS} non-negative integers")
        if not all(type(o) is int and o >= 0 for o in span):
            raise UploadRejected(f"tensor {name!r}: data_offsets must be non-negative integers")
        elements = math.prod(shape)  # Python ints: [2**40, 2**40] cannot wrap around
        if elements * _DTYPES[t["dtype"]] != span[1] - span[0]:
            raise UploadRejected(f"tensor {name!r}: shape {str(shape)[:100]} of {t['dtype']} "
                                 f"needs {elements * _DTYPES[t['dtype']]} bytes, its data has "
                                 f"{span[1] - span[0]}")
        spans.append(tuple(span))
        tensors[name] = {"dtype": t["dtype"], "shape": shape}
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos or end < begin:
            raise UploadRejected("not a safetensors file: tensor byte ranges do not tile")
        pos = end
    if 8 + n + pos != size:
        raise UploadRejected("not a safetensors file: the data section has the wrong length")
    if not tensors:
        raise UploadRejected("the safetensors file holds no tensors")
    return tensors


def spool(stream: BinaryIO, dest: Path, limit: int, check) -> Any:
    """Copy an upload to a temporary file next to ``dest`` counting bytes (413 past
    ``limit``), run ``check(tmp_path)`` on it, and only then move it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_file(dest.parent, "", ".upload")
    try:
        with os.fdopen(fd, "wb") as out:
            copied = 0
            while block := stream.read(1 << 20):
                copied += len(block)
                if copied > limit:
                    raise UploadRejected(f"upload larger than {limit} bytes", 413)
                out.write(block)
        result = check(tmp)
        os.replace(tmp, dest)
        return result
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def store_upload(store, settings, blobs: Artifacts, tenant_id: str, stream: BinaryIO, *,
                 arch: str, meta: dict[str, Any]):
    if arch not in ALLOWED_ARCHS:
        raise UploadRejected(f"arch must be one of {list(ALLOWED_ARCHS)}, got {arch!r}")
    model_id = new_id()
    dest = model_path(settings, tenant_id, model_id)
    tensors = spool(stream, dest, settings.max_upload_bytes, check_safetensors)
    blobs.push(model_key(tenant_id, model_id), dest)  # for workers on other hosts
    meta = {**meta, "tensors": len(tensors)}
    return store.add_model(tenant_id, arch=arch, meta=meta, path=str(dest),
                           sha256=sha256_file(dest), size=dest.stat().st_size,
                           model_id=model_id)


def check_npz(path: str) -> dict[str, Any]:
    """Read the upload as the worker will (numpy only, no pickles); its shape and classes."""
    from bulwark.contract.datasets import DataError, load_npz

    try:
        trx, tr_y, tex, te_y = load_npz(Path(path))
    except DataError as e:  # the message names the temporary file: say "the upload" instead
        raise UploadRejected(str(e).replace(str(path), "the upload")) from None
    classes = int(max(tr_y.max(initial=-1), te_y.max(initial=-1))) + 1
    if classes < 2:
        raise UploadRejected("the upload's labels span fewer than 2 classes")
    return {"train": int(len(trx)), "test": int(len(tex)), "shape": list(trx.shape[1:]),
            "num_classes": classes}


def store_dataset(store, settings, blobs: Artifacts, tenant_id: str, stream: BinaryIO):
    dataset_id = new_id()
    dest = dataset_path(settings, tenant_id, dataset_id)
    meta = spool(stream, dest, settings.max_upload_bytes, check_npz)
    blobs.push(dataset_key(tenant_id, dataset_id), dest)
    return store.add_dataset(tenant_id, meta=meta, path=str(dest), sha256=sha256_file(dest),
                             size=dest.stat().st_size, dataset_id=dataset_id)
