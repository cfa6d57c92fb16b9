"""The array formats a tenant may bring as a dataset (``.npz``), read and checked with numpy
alone — never a pickle (torch-free: the API checks an upload with the same code the worker
loads it with).

An ``.npz`` holds ``x_train``, ``y_train``, ``x_test``, ``y_test``: images uint8 (or float in
[0, 1]) NHWC or NHW with 1–4 channels, labels integers in 0 .. MAX_CLASSES - 1 (999), one per
image.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from bulwark.contract.spec import MAX_CLASSES

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A dataset is missing or a file is malformed; the message names the file and the fault."""


class DataNotFound(DataError):
    """A named dataset's files are in none of the data roots (the message lists them)."""


# Datasets a job may name through the API (resolved under the operator's data roots, or built
# in); a tenant's own data is an uploaded .npz, named "datasets/<id>".
SERVER_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "digits",
                   "synthetic")
UPLOAD_REF = re.compile(r"datasets/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def api_dataset_problem(d: Any) -> tuple[str, str, Any] | None:
    """What a ``DatasetSpec`` submitted through the API may not do, as (field, message, value):
    name a server path (``root``, a plain ``path``) or ask for a download. Paths and
    downloads are `bulwark run` features; the API and the worker both check this."""
    if d.root is not None:
        return ("root", "server paths cannot be named through the API (a `bulwark run` "
                "feature): use a dataset the server has, by name (" + ", ".join(SERVER_DATASETS)
                + "), or upload one with POST /v1/datasets", d.root)
    if d.download:
        return ("download", "downloads are not allowed through the API; the operator places "
                "datasets under the server's data root", True)
    if d.name == "npz" and not UPLOAD_REF.fullmatch(d.path or ""):
        return ("path", "must be 'datasets/<id>' of a dataset you uploaded with POST "
                "/v1/datasets", d.path)
    return None


def images(x: object, path: Path, what: str = "images") -> np.ndarray:
    """``x`` itself when it is a uint8 [N, C, H, W] array (DataError otherwise)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or 0 in x.shape[1:]:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: {what} must be a uint8 [N, C, H, W] array, got {desc}")
    return x


def labels(y: object, path: Path, n: int, hi: int | None, what: str = "labels",
           lo: int = 0) -> np.ndarray:
    """n integer labels (1-D or [n, 1]) in lo..hi (no upper bound if hi is None), as int64."""
    try:
        y = np.asarray(y)
    except ValueError as e:  # ragged nested lists
        raise DataError(f"{path}: {what} are not a flat list of integers ({e})") from e
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "iuf" or (
        y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y)))
    ):
        raise DataError(f"{path}: {what} must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != n:
        raise DataError(f"{path}: {len(y)} {what} for {n} images (the counts must match)")
    if len(y) and (y.min() < lo or (hi is not None and y.max() > hi)):
        want = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
        raise DataError(f"{path}: {what} must be {want}, found {y.min()}..{y.max()}")
    return y.astype(np.int64)


def npz_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """uint8 or float-in-[0,1] images, NHWC or NHW, as uint8 NCHW."""
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or not 1 <= x.shape[3] <= 4:
        raise DataError(f"{path}: {key} must be NHWC (1-4 channels) or NHW, got shape {x.shape}")
    if x.dtype.kind == "f":
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DataError(
                f"{path}: float {key} must lie in [0, 1], found [{x.min()}, {x.max()}]"
            )
        x = np.round(x * 255.0).astype(np.uint8)
    elif x.dtype != np.uint8:
        raise DataError(f"{path}: {key} must be uint8 or float in [0, 1], got {x.dtype}")
    return images(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), path, key)


def load_npz(path: Path) -> tuple[np.ndarray, ...]:
    """A user .npz with x_train, y_train, x_test, y_test (no pickled objects)."""
    if not path.is_file():
        raise DataError(f"{path}: npz file not found (dataset.path)")
    keys = NPZ_KEYS
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (has {z.files})")
            arrays = {k: z[k] for k in keys}
    except DataError:
        raise
    except Exception as e:  # object arrays raise ValueError; corrupt zips BadZipFile etc.
        raise DataError(f"{path}: cannot read npz ({type(e).__name__}: {e})") from e
    trx = npz_images(arrays["x_train"], path, "x_train")
    tex = npz_images(arrays["x_test"], path, "x_test")
    if trx.shape[1:] != tex.shape[1:]:
        raise DataError(f"{path}: x_train images {trx.shape[1:]} != x_test {tex.shape[1:]}")
    ys = []
    for key, n in (("y_train", len(trx)), ("y_test", len(tex))):
        y = arrays[key]
        if y.dtype.kind not in "iu":
            raise DataError(f"{path}: {key} must be integers, got {y.dtype}")
        ys.append(labels(y, path, n, MAX_CLASSES - 1, key))
    return trx, ys[0], tex, ys[1]
