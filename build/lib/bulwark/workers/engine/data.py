"""Datasets as uint8 tensors, and a loader that keeps them on the device.

``load_dataset(spec)`` reads one of the standard on-disk formats (idx for MNIST and
Fashion-MNIST, the python pickles of CIFAR-10/100, the .mat files of SVHN), scikit-learn's
digits, seeded synthetic images, or a user ``.npz``. Every file is parsed strictly: a wrong
header, shape, dtype, value or label range raises ``DataError`` naming the file. The CIFAR
pickles are read with a restricted unpickler that builds numpy arrays and nothing else.

Images stay uint8 ``[N, C, H, W]``; ``DeviceLoader`` moves the whole set to the device once
and yields float batches in [0, 1] (normalization is a layer inside the model, using the
dataset's ``mean``/``std``). Shuffling and augmentation draw only from the generator passed
to ``DeviceLoader.epoch``, so a run is reproducible and resumable.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bulwark.contract.spec import DatasetSpec, SyntheticSpec

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

from bulwark.contract.datasets import DataError, DataNotFound, load_npz
from bulwark.contract.datasets import images as _images
from bulwark.contract.datasets import labels as _labels

ENV_ROOT = "BULWARK_DATA_ROOT"
LIMIT_SEED = 0  # the fixed shuffle behind dataset.train_limit
DIGITS_SEED = 0  # the fixed 80/20 split of scikit-learn's digits


@dataclass
class ImageDataset:
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W], contiguous
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor  # uint8 [M, C, H, W]
    test_y: torch.Tensor  # int64 [M]
    num_classes: int
    mean: tuple[float, ...]  # per channel, [0, 1] units
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[2])


# name -> (folder names accepted, files, num_classes, mean, std, crop_padding, flip)
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_STANDARD = {
    "mnist": (("mnist",), _IDX_FILES, 10, (0.1307,), (0.3081,), 0, False),
    "fashion_mnist": (
        ("fashion_mnist", "fashion-mnist"), _IDX_FILES, 10, (0.2860,), (0.3530,), 0, False
    ),
    "cifar10": (
        ("cifar-10-batches-py",), _CIFAR10_FILES, 10,
        (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), 4, True,
    ),
    "cifar100": (
        ("cifar-100-python",), ("train", "test"), 100,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True,
    ),
    "svhn": (
        ("svhn",), ("train_32x32.mat", "test_32x32.mat"), 10,
        (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 4, False,
    ),
}

_URLS = {
    "mnist": [f"https://ossci-datasets.s3.amazonaws.com/mnist/{f}.gz" for f in _IDX_FILES],
    "fashion_mnist": [
        f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{f}.gz" for f in _IDX_FILES
    ],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"],
    "svhn": [f"http://ufldl.stanford.edu/housenumbers/{f}" for f in _STANDARD["svhn"][1]],
}


# ---------------------------------------------------------------------------------- roots
# The data that ships with Bulwark (the real MNIST, verified on every load).
BUNDLED_ROOT = Path(__file__).resolve().parents[2] / "data"


def resolve_data_root(root: str | None) -> list[Path]:
    """Candidate data roots, in the order they are searched (absolute, without duplicates).

    ``root`` (``dataset.root``), ``$BULWARK_DATA_ROOT``, ``./data`` (relative to the current
    directory), and the repository's own ``data/`` (``BUNDLED_ROOT``), which holds MNIST.
    """
    cwd = Path.cwd()
    raw = [root, os.environ.get(ENV_ROOT) or None, cwd / "data", BUNDLED_ROOT]
    out: list[Path] = []
    for r in raw:
        if r is None:
            continue
        p = Path(r).expanduser()
        p = (p if p.is_absolute() else cwd / p).resolve()
        if p not in out:
            out.append(p)
    return out


def _locate(folder: Path, fname: str) -> Path | None:
    """``folder/fname`` or its gzipped ``folder/fname.gz``, whichever exists."""
    for p in (folder / fname, folder / f"{fname}.gz"):
        if p.is_file():
            return p
    return None


def _find_standard(name: str, spec: DatasetSpec) -> dict[str, Path]:
    """The first candidate folder holding all of the dataset's files (downloading if asked)."""
    folders, files = _STANDARD[name][:2]
    roots = resolve_data_root(spec.root)
    looked = []
    for root in roots:
        for sub in folders:
            folder = root / sub
            found = {f: _locate(folder, f) for f in files}
            if all(found.values()):
                return found
            missing = [f for f, p in found.items() if p is None]
            state = "missing" if not folder.is_dir() else "lacks " + ", ".join(missing)
            looked.append(f"  {folder} ({state})")
    need = f"{folders[0]}/{{{', '.join(files)}}}"
    how = ("Place the files by hand in one of those folders (e.g. "
           f"{roots[0] / folders[0]}), point dataset.root or the environment variable "
           f"{ENV_ROOT} at a folder that holds {folders[0]}/")
    if spec.download:
        try:
            _download(name, roots[0])
        except DataError as e:
            raise DataError(
                f"dataset {name!r}: {e}\nNot found locally either; looked in:\n"
                + "\n".join(looked) + f"\n{how}. The files: "
                + ", ".join(u.rsplit("/", 1)[1] for u in _URLS[name])
                + f" (published at {_URLS[name][0].rsplit('/', 1)[0]}/).") from e
        found = {f: _locate(roots[0] / folders[0], f) for f in files}
        if all(found.values()):
            return found
        looked.append(f"  {roots[0] / folders[0]} (still incomplete after the download)")
    raise DataNotFound(
        f"dataset {name!r} not found: need {need} (each raw or .gz). Looked in:\n"
        + "\n".join(looked) + f"\n{how}, or set dataset.download: true on a machine with "
        "internet access."
    )


# SHA-256 of the uncompressed MNIST files (the published originals): every load is checked
# against them, and a download before it is kept.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def verify_checksums(folder: Path, expected: dict[str, str]) -> None:
    """Raise DataError unless every file (raw or .gz) has its expected uncompressed SHA-256."""
    for fname, digest in expected.items():
        path = _locate(folder, fname)
        if path is None:
            raise DataError(f"{folder / fname}: missing after the download")
        got = hashlib.sha256(_read_bytes(path)).hexdigest()
        if got != digest:
            path.unlink()
            raise DataError(f"{path}: checksum mismatch (sha256 {got}, expected {digest}); "
                            "the file was removed")


def _download(name: str, root: Path) -> None:
    """Fetch the standard files into ``root`` (opt-in via ``dataset.download``)."""
    folder = root / _STANDARD[name][0][0]
    folder.mkdir(parents=True, exist_ok=True)
    for url in _URLS[name]:
        fname = url.rsplit("/", 1)[1]
        dest = (root if fname.endswith(".tar.gz") else folder) / fname
        tmp = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{url}: download failed ({e})") from e
        tmp.replace(dest)
        if fname.endswith(".tar.gz"):
            try:
                with tarfile.open(dest) as tar:
                    tar.extractall(root, filter="data")
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"{dest}: could not extract the archive ({e})") from e
            dest.unlink()
    if name == "mnist":
        verify_checksums(folder, MNIST_SHA256)


# ---------------------------------------------------------------------------------- checks
def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of uint8 [N, C, H, W] images, in [0, 1] units."""
    v = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        h = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        h /= max(h.sum(), 1.0)
        m = float(h @ v)
        means.append(m)
        stds.append(max(float(np.sqrt(max(h @ (v - m) ** 2, 0.0))), 1e-3))
    return tuple(means), tuple(stds)


# ---------------------------------------------------------------------------------- formats
def read_idx(path: Path, magic: int, sha256: str | None = None) -> np.ndarray:
    """An idx file (raw or .gz): big-endian magic ``0x0000 <type 0x08> <ndim>``, ndim uint32
    dims, then exactly prod(dims) unsigned bytes. 2051 = 3-D images, 2049 = 1-D labels.
    ``sha256``: the expected digest of the uncompressed bytes (DataError on a mismatch)."""
    raw = _read_bytes(path)
    if sha256 is not None and (got := hashlib.sha256(raw).hexdigest()) != sha256:
        raise DataError(f"{path}: not the published file (sha256 {got}, expected {sha256}); "
                        "replace it with the original, or remove it to use Bulwark's copy")
    if len(raw) < 4:
        raise DataError(f"{path}: truncated idx file ({len(raw)} bytes, no header)")
    (got,) = struct.unpack(">I", raw[:4])
    if got != magic:
        raise DataError(f"{path}: bad idx magic number {got} (expected {magic})")
    ndim = magic & 0xFF
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated idx header ({len(raw)} of {head} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) != head + size:
        state = "truncated" if len(raw) < head + size else "has trailing bytes"
        raise DataError(
            f"{path}: idx file {state}: dims {dims} need {size} data bytes, "
            f"found {len(raw) - head}"
        )
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def _load_idx(files: dict[str, Path], digests: dict[str, str] | None = None
              ) -> tuple[np.ndarray, ...]:
    """MNIST / Fashion-MNIST: train and t10k idx image/label pairs; with ``digests``, each
    file's uncompressed SHA-256 must match (the published MNIST)."""
    out = []
    for split in ("train", "t10k"):
        ip, lp = files[f"{split}-images-idx3-ubyte"], files[f"{split}-labels-idx1-ubyte"]
        x = read_idx(ip, 2051, digests and digests[f"{split}-images-idx3-ubyte"])[:, None]
        y = read_idx(lp, 2049, digests and digests[f"{split}-labels-idx1-ubyte"])
        out += [_images(x, ip), _labels(y, lp, len(x), 9)]
    return tuple(out)


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dicts, lists, bytes and numbers; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def __init__(self, file: io.BytesIO, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: the pickle references {module}.{name}; only numpy arrays are "
                "allowed (refusing to load it)"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise DataError(f"{self.path}: the pickle uses persistent ids (refusing to load it)")


def load_array_pickle(path: Path) -> object:
    """Unpickle ``path`` (raw or .gz) allowing only numpy arrays and plain containers."""
    raw = _read_bytes(path)
    try:
        return _ArrayUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except Exception as e:  # malformed pickles raise all sorts of errors
        raise DataError(f"{path}: not a valid pickle ({type(e).__name__}: {e})") from e


def _cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, ...]:
    """One CIFAR pickle: {b'data': uint8 [N, 3072] channel-major, label_key: N labels}."""
    d = load_array_pickle(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path}: expected a dict with b'data' and {label_key!r}, got {keys}")
    x = d[b"data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: b'data' must be a uint8 [N, 3072] array, got {desc}")
    return x.reshape(-1, 3, 32, 32), _labels(d[label_key], path, len(x), num_classes - 1)


def _load_cifar(files: dict[str, Path], train: tuple[str, ...], test: str,
                label_key: bytes, num_classes: int) -> tuple[np.ndarray, ...]:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) pickles."""
    parts = [_cifar_batch(files[f], label_key, num_classes) for f in train]
    tx, ty = _cifar_batch(files[test], label_key, num_classes)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), tx, ty)


def _svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN .mat file: X uint8 (32, 32, 3, N), y (N, 1) with labels 1..10 (10 = digit 0)."""
    import scipy.io

    try:
        m = scipy.io.loadmat(io.BytesIO(_read_bytes(path)))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from e
    if "X" not in m or "y" not in m:
        raise DataError(f"{path}: expected variables X and y, got {sorted(m)}")
    x = m["X"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: X must be a uint8 (H, W, 3, N) array, got {desc}")
    y = _labels(m["y"], path, x.shape[3], 10, "labels y", lo=1)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10


def _load_svhn(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    return _svhn_split(files["train_32x32.mat"]) + _svhn_split(files["test_32x32.mat"])


def _load_digits() -> tuple[np.ndarray, ...]:
    """scikit-learn's 8x8 digits (0..16 -> uint8), split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SEED).permutation(len(x))
    n_test = round(0.2 * len(x))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def synthetic_images(s: SyntheticSpec) -> tuple[np.ndarray, ...]:
    """Seeded class blobs: per class a smooth random prototype (low-res noise upsampled);
    an image is its class prototype at a random low contrast plus strong pixel noise, clipped
    to uint8 (a linear model reaches roughly 80-90% on the default 28x28, 10 classes)."""
    g = torch.Generator().manual_seed(s.seed)
    low = max(2, s.image_size // 4)
    protos = torch.rand(s.num_classes, s.channels, low, low, generator=g)
    protos = F.interpolate(protos, size=(s.image_size,) * 2, mode="bilinear", align_corners=False)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = torch.arange(n) % s.num_classes
        y = y[torch.randperm(n, generator=g)]
        contrast = 0.05 + 0.2 * torch.rand(n, 1, 1, 1, generator=g)
        noise = 0.4 * torch.randn(n, s.channels, s.image_size, s.image_size, generator=g)
        x = 0.5 + 2 * contrast * (protos[y] - 0.5) + noise
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return x.numpy(), y.numpy()

    return split(s.n_train) + split(s.n_test)


# ---------------------------------------------------------------------------------- loading
def locate_dataset(spec: DatasetSpec) -> str:
    """Where ``spec``'s data would be read from, without reading or downloading it
    (DataError, naming every place looked in, when it is nowhere)."""
    if spec.name in _STANDARD:
        local = spec.model_copy(update={"download": False})
        try:
            files = _find_standard(spec.name, local)
        except DataError:
            if spec.download:
                return (f"nowhere locally; dataset.download is on, so the run would fetch it "
                        f"into {resolve_data_root(spec.root)[0]}")
            raise
        return str(next(iter(files.values())).parent)
    if spec.name == "npz":
        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise DataError(f"dataset.path {path}: no such file")
        return str(path)
    return {"digits": "scikit-learn's load_digits (ships with scikit-learn)",
            "synthetic": "generated from dataset.synthetic (seeded)"}[spec.name]


def load_dataset(spec: DatasetSpec) -> ImageDataset:
    """Read the dataset that ``spec`` names; apply limits and augmentation overrides."""
    name = spec.name
    if name in _STANDARD:
        _, _, k, mean, std, crop, flip = _STANDARD[name]
        files = _find_standard(name, spec)
        if name in ("mnist", "fashion_mnist"):
            arrays = _load_idx(files, MNIST_SHA256 if name == "mnist" else None)
        elif name == "cifar10":
            arrays = _load_cifar(files, _CIFAR10_FILES[:5], "test_batch", b"labels", 10)
        elif name == "cifar100":
            arrays = _load_cifar(files, ("train",), "test", b"fine_labels", 100)
        else:
            arrays = _load_svhn(files)
        source = str(next(iter(files.values())).parent)
    elif name == "digits":
        arrays, k, crop, flip, source = _load_digits(), 10, 0, False, "sklearn digits"
        mean, std = _channel_stats(arrays[0])
    elif name == "synthetic":
        arrays, crop, flip, source = synthetic_images(spec.synthetic), 0, False, "synthetic"
        k = spec.synthetic.num_classes
        mean, std = (0.5,) * spec.synthetic.channels, (0.25,) * spec.synthetic.channels
    elif name == "npz":
        source = str(Path(spec.path).expanduser())
        arrays, crop, flip = load_npz(Path(source)), 0, False
        k = int(max(arrays[1].max(initial=-1), arrays[3].max(initial=-1))) + 1
        if k < 2:
            raise DataError(f"{source}: labels must span at least 2 classes, found {k}")
        mean, std = _channel_stats(arrays[0])
    else:  # pragma: no cover - the spec's Literal forbids it
        raise DataError(f"unknown dataset {name!r}")

    trx, tr_y, tex, te_y = arrays
    if spec.train_limit is not None and spec.train_limit < len(trx):
        keep = np.random.default_rng(LIMIT_SEED).permutation(len(trx))[: spec.train_limit]
        trx, tr_y = trx[keep], tr_y[keep]
    if spec.test_limit is not None:
        tex, te_y = tex[: spec.test_limit], te_y[: spec.test_limit]
    ds = ImageDataset(
        name=name,
        train_x=torch.from_numpy(np.array(trx, dtype=np.uint8, order="C")),
        train_y=torch.from_numpy(np.array(tr_y, dtype=np.int64)),
        test_x=torch.from_numpy(np.array(tex, dtype=np.uint8, order="C")),
        test_y=torch.from_numpy(np.array(te_y, dtype=np.int64)),
        num_classes=int(k),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        crop_padding=crop if spec.crop_padding is None else spec.crop_padding,
        flip=flip if spec.flip is None else spec.flip,
    )
    check_dataset(ds, source)
    return ds


def check_dataset(ds: ImageDataset, source: str = "dataset") -> None:
    """The invariants every ImageDataset holds; DataError naming ``source`` otherwise."""
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        if x.dtype != torch.uint8 or x.dim() != 4 or not x.is_contiguous():
            raise DataError(f"{source}: {split} images must be contiguous uint8 [N, C, H, W], "
                            f"got {x.dtype} {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise DataError(f"{source}: {split} labels must be int64 [{x.shape[0]}], "
                            f"got {y.dtype} {tuple(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= ds.num_classes):
            raise DataError(f"{source}: {split} labels outside [0, {ds.num_classes})")
    if len(ds.train_x) == 0:
        raise DataError(f"{source}: no training images")
    if ds.train_x.shape[1:] != ds.test_x.shape[1:]:
        raise DataError(f"{source}: train images {tuple(ds.train_x.shape[1:])} != test "
                        f"{tuple(ds.test_x.shape[1:])}")
    if not (len(ds.mean) == len(ds.std) == ds.channels):
        raise DataError(f"{source}: mean/std need one value per channel ({ds.channels})")


def split_validation(
    train_x: torch.Tensor, train_y: torch.Tensor, val_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed held-out slice: ``val_size`` images chosen by a seeded permutation.

    Returns ``(train_x, train_y, val_x, val_y)``; the remaining training images keep their
    original order. Deterministic for a seed.
    """
    n = len(train_x)
    if not 0 <= val_size < n:
        raise DataError(f"dataset.val_size {val_size} must be in [0, {n}) for {n} train images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, keep = perm[:val_size], perm[val_size:].sort().values
    return train_x[keep], train_y[keep], train_x[val_idx], train_y[val_idx]


# ---------------------------------------------------------------------------------- batches
def augment(x: torch.Tensor, crop_padding: int, flip: bool,
            generator: torch.Generator) -> torch.Tensor:
    """Batched random crop (zero padding) and horizontal flip of float ``x`` [B, C, H, W].

    Draws, in order, from ``generator`` (on its device, then moved to ``x``'s): offsets
    ``torch.randint(0, 2p+1, (2, B))`` (rows, cols) into the zero-padded image when
    ``crop_padding`` p > 0, then a flip mask ``torch.rand(B) < 0.5`` when ``flip``.
    """
    b, c, h, w = x.shape
    if crop_padding > 0:
        p = crop_padding
        off = torch.randint(0, 2 * p + 1, (2, b), generator=generator,
                            device=generator.device).to(x.device)
        padded = F.pad(x, (p, p, p, p)).flatten(2)  # [B, C, (H+2p)(W+2p)]
        rows = torch.arange(h, device=x.device)[None, :, None] + off[0][:, None, None]
        cols = torch.arange(w, device=x.device)[None, None, :] + off[1][:, None, None]
        idx = (rows * (w + 2 * p) + cols).reshape(b, 1, h * w).expand(b, c, h * w)
        x = padded.gather(2, idx).view(b, c, h, w)
    if flip:
        mask = torch.rand(b, generator=generator, device=generator.device) < 0.5
        x = torch.where(mask.to(x.device)[:, None, None, None], x.flip(3), x)
    return x


class DeviceLoader:
    """Dataset on the device as one uint8 tensor; batches as float in [0,1] on the device."""

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int, *,
                 device: torch.device | str, crop_padding: int = 0, flip: bool = False,
                 shuffle: bool = True, drop_last: bool = False):
        if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4 or len(y) != len(x_uint8):
            raise DataError(f"DeviceLoader needs uint8 [N, C, H, W] images and N labels, got "
                            f"{x_uint8.dtype} {tuple(x_uint8.shape)} and {len(y)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = x_uint8.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
        self.batch_size, self.crop_padding, self.flip = batch_size, crop_padding, flip
        self.shuffle, self.drop_last = shuffle, drop_last

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass: a permutation drawn from ``generator`` (if shuffling), then per batch the
        augmentation draws from the same generator; yields (float [B,C,H,W] in [0,1], labels)."""
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=generator, device=generator.device)
            order = order.to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            xb = self.x[idx].float().div_(255.0)
            if self.crop_padding or self.flip:
                xb = augment(xb, self.crop_padding, self.flip, generator)
            yield xb, self.y[idx]
