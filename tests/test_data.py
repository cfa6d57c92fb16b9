"""bulwark.workers.engine.data: format parsers against files written here by independent writers,
rejection of corrupt or malicious files, augmentation against hand-computed slices, and the
loader."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from bulwark.contract.spec import DatasetSpec, SyntheticSpec
from bulwark.workers.engine.data import (
    BUNDLED_ROOT,
    DataError,
    DeviceLoader,
    augment,
    load_dataset,
    resolve_data_root,
    split_validation,
)

RNG = np.random.default_rng(1234)


# ---------------------------------------------------------------------------------- writers
def write_idx(path: Path, arr: np.ndarray, magic: int, gz: bool = False) -> Path:
    """The idx format: big-endian uint32 magic, one big-endian uint32 per dim, then bytes."""
    data = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data += arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_idx_set(root: Path, folder: str = "fashion_mnist", n=(12, 5), hw=(28, 28),
                 gz=(False, True)):
    """A tiny Fashion-MNIST-style set (idx files; MNIST itself must be the published files):
    train files raw, test files gzipped (by default)."""
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count, use_gz in (("train", n[0], gz[0]), ("t10k", n[1], gz[1])):
        x = RNG.integers(0, 256, (count, *hw), dtype=np.uint8)
        y = RNG.integers(0, 10, count, dtype=np.uint8)
        write_idx(d / f"{split}-images-idx3-ubyte", x, 2051, use_gz)
        write_idx(d / f"{split}-labels-idx1-ubyte", y, 2049, use_gz)
        arrays[split] = (x, y)
    return arrays


def cifar_dict(n: int, label_key: bytes, num_classes: int) -> dict:
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in RNG.integers(0, num_classes, n)]
    d = {b"batch_label": b"testing batch", b"data": data, label_key: labels,
         b"filenames": [b"img_%d.png" % i for i in range(n)]}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [v // 5 for v in labels]
    return d


def dump(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(root: Path, n: int = 4) -> list[dict]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    batches = [cifar_dict(n, b"labels", 10) for _ in range(6)]
    for i, b in enumerate(batches[:5], 1):
        dump(d / f"data_batch_{i}", b)
    dump(d / "test_batch", batches[5])
    return batches


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------- idx
def test_idx_raw_and_gz_parse_exactly(tmp_path):
    arrays = make_idx_set(tmp_path)
    ds = load_dataset(DatasetSpec(name="fashion_mnist", root=str(tmp_path), val_size=0))
    for (x, y), tx, ty in ((arrays["train"], ds.train_x, ds.train_y),
                           (arrays["t10k"], ds.test_x, ds.test_y)):
        assert tx.dtype == torch.uint8 and tx.shape == (len(x), 1, 28, 28) and tx.is_contiguous()
        assert np.array_equal(tx[:, 0].numpy(), x)
        assert ty.dtype == torch.int64 and np.array_equal(ty.numpy(), y)
    assert (ds.num_classes, ds.mean, ds.std) == (10, (0.2860,), (0.3530,))
    assert (ds.crop_padding, ds.flip, ds.channels, ds.image_size) == (0, False, 1, 28)


def test_fashion_mnist_hyphen_folder_and_stats(tmp_path):
    arrays = make_idx_set(tmp_path, "fashion-mnist", gz=(True, False))
    ds = load_dataset(DatasetSpec(name="fashion_mnist", root=str(tmp_path)))
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train"][0])
    assert (ds.mean, ds.std) == ((0.2860,), (0.3530,))


@pytest.mark.parametrize("fault", ["magic", "truncated", "trailing", "label_range", "count",
                                   "bad_gzip", "header"])
def test_idx_corruptions_name_the_file(tmp_path, fault):
    make_idx_set(tmp_path, gz=(False, False))
    d = tmp_path / "fashion_mnist"
    target = d / "train-images-idx3-ubyte"
    x = RNG.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    if fault == "magic":
        write_idx(target, x, 2049)
    elif fault == "truncated":
        write_idx(target, x, 2051)
        target.write_bytes(target.read_bytes()[:-7])
    elif fault == "trailing":
        write_idx(target, x, 2051)
        target.write_bytes(target.read_bytes() + b"\0")
    elif fault == "label_range":
        target = d / "train-labels-idx1-ubyte"
        write_idx(target, np.full(12, 10, np.uint8), 2049)
    elif fault == "count":
        target = d / "train-labels-idx1-ubyte"
        write_idx(target, np.zeros(11, np.uint8), 2049)
    elif fault == "bad_gzip":
        target.unlink()
        target = d / "train-images-idx3-ubyte.gz"
        target.write_bytes(gzip.compress(b"x" * 100)[:20])
    elif fault == "header":
        target.write_bytes(struct.pack(">I", 2051) + b"\0\0\0\x0c")
    with pytest.raises(DataError, match=target.name):
        load_dataset(DatasetSpec(name="fashion_mnist", root=str(tmp_path)))


# ---------------------------------------------------------------------------------- cifar
def test_cifar10_pickles_channel_major_to_chw(tmp_path):
    batches = make_cifar10(tmp_path, n=4)
    ds = load_dataset(DatasetSpec(name="cifar10", root=str(tmp_path)))
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    data = np.concatenate([b[b"data"] for b in batches[:5]])
    labels = sum((b[b"labels"] for b in batches[:5]), [])
    assert ds.train_y.tolist() == labels and ds.test_y.tolist() == batches[5][b"labels"]
    # independent oracle: pixel (c, r, col) of image i is data[i, c*1024 + r*32 + col]
    for i, c, r, col in ((0, 0, 0, 0), (3, 1, 5, 31), (17, 2, 31, 7), (9, 2, 16, 16)):
        assert int(ds.train_x[i, c, r, col]) == int(data[i, c * 1024 + r * 32 + col])
    assert np.array_equal(ds.train_x.numpy().reshape(20, -1), data)
    assert np.array_equal(ds.test_x.numpy().reshape(4, -1), batches[5][b"data"])
    assert (ds.crop_padding, ds.flip, ds.num_classes) == (4, True, 10)
    assert ds.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    train, test = cifar_dict(6, b"fine_labels", 100), cifar_dict(3, b"fine_labels", 100)
    train[b"fine_labels"][0] = 99
    dump(d / "train", train)
    dump(d / "test", test)
    ds = load_dataset(DatasetSpec(name="cifar100", root=str(tmp_path), crop_padding=2, flip=False))
    assert ds.num_classes == 100 and ds.train_y.tolist() == train[b"fine_labels"]
    assert np.array_equal(ds.test_x.numpy().reshape(3, -1), test[b"data"])
    assert (ds.crop_padding, ds.flip) == (2, False)  # spec overrides the dataset defaults


class _SystemCall:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalCall:
    def __init__(self, marker: Path):
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (builtins.eval, (self.code,))


@pytest.mark.parametrize("kind", ["system", "eval"])
def test_malicious_pickle_is_refused_without_side_effect(tmp_path, kind):
    def payload(marker: Path) -> object:
        return _SystemCall(f"touch {marker}") if kind == "system" else _EvalCall(marker)

    # the payload is real: the plain unpickler runs it
    armed = tmp_path / "plain_unpickler_ran"
    pickle.loads(pickle.dumps(payload(armed), protocol=2))
    assert armed.exists()

    make_cifar10(tmp_path)
    marker = tmp_path / "loader_ran_it"
    batch = cifar_dict(4, b"labels", 10)
    batch[b"data"] = payload(marker)
    dump(tmp_path / "cifar-10-batches-py" / "data_batch_3", batch)
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(DatasetSpec(name="cifar10", root=str(tmp_path)))
    assert not marker.exists()


@pytest.mark.parametrize("fault", ["shape", "label_range", "not_dict", "count", "garbage"])
def test_cifar_corruptions(tmp_path, fault):
    make_cifar10(tmp_path)
    b = cifar_dict(4, b"labels", 10)
    if fault == "shape":
        b[b"data"] = b[b"data"][:, :3000]
    elif fault == "label_range":
        b[b"labels"][2] = 10
    elif fault == "not_dict":
        b = [b[b"data"]]
    elif fault == "count":
        b[b"labels"] = b[b"labels"][:3]
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    dump(target, b)
    if fault == "garbage":
        target.write_bytes(target.read_bytes()[:50])
    with pytest.raises(DataError, match="test_batch"):
        load_dataset(DatasetSpec(name="cifar10", root=str(tmp_path)))


# ---------------------------------------------------------------------------------- svhn
def write_svhn(path: Path, n: int, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = RNG.integers(1, 11, (n, 1), dtype=np.uint8) if y is None else y
    scipy.io.savemat(path, {"X": x, "y": y})
    return x, y


def test_svhn_mat_transpose_and_label_10_is_0(tmp_path):
    d = tmp_path / "svhn"
    d.mkdir()
    x, _ = write_svhn(d / "train_32x32.mat", 5, np.array([[10], [1], [9], [10], [3]], np.uint8))
    tx, ty = write_svhn(d / "test_32x32.mat", 3)
    ds = load_dataset(DatasetSpec(name="svhn", root=str(tmp_path)))
    assert ds.train_y.tolist() == [0, 1, 9, 0, 3]
    assert ds.test_y.tolist() == [int(v) % 10 for v in ty[:, 0]]
    assert ds.train_x.shape == (5, 3, 32, 32)
    for i, c, h, w in ((0, 0, 0, 0), (4, 2, 31, 0), (2, 1, 7, 19)):
        assert int(ds.train_x[i, c, h, w]) == int(x[h, w, c, i])
    assert np.array_equal(ds.test_x.numpy(), tx.transpose(3, 2, 0, 1))
    assert (ds.crop_padding, ds.flip) == (4, False)


@pytest.mark.parametrize("labels", [[0, 1, 2], [1, 11, 2], [1, 2]])
def test_svhn_bad_labels(tmp_path, labels):
    d = tmp_path / "svhn"
    d.mkdir()
    write_svhn(d / "train_32x32.mat", 3, np.array(labels, np.uint8)[:, None])
    write_svhn(d / "test_32x32.mat", 3)
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset(DatasetSpec(name="svhn", root=str(tmp_path)))


# ---------------------------------------------------------------------------------- npz
def test_npz_uint8_nhwc(tmp_path):
    xtr = RNG.integers(0, 256, (7, 6, 5, 3), dtype=np.uint8)
    xte = RNG.integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    ytr, yte = np.array([0, 1, 2, 3, 0, 1, 2]), np.array([3, 1])
    p = write_npz(tmp_path / "d.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = load_dataset(DatasetSpec(name="npz", path=str(p)))
    assert np.array_equal(ds.train_x.numpy(), xtr.transpose(0, 3, 1, 2))
    assert np.array_equal(ds.test_x.numpy(), xte.transpose(0, 3, 1, 2))
    assert ds.train_y.tolist() == ytr.tolist() and ds.num_classes == 4
    expected = xtr.reshape(-1, 3).astype(np.float64) / 255
    assert np.allclose(ds.mean, expected.mean(0)) and np.allclose(ds.std, expected.std(0))
    assert (ds.crop_padding, ds.flip) == (0, False)


def test_npz_float_grayscale_nhw(tmp_path):
    xtr = RNG.random((4, 5, 5)).astype(np.float32)
    xtr[0, 0, 0], xtr[0, 0, 1] = 0.0, 1.0
    p = write_npz(tmp_path / "d.npz", x_train=xtr, y_train=np.array([0, 1, 1, 0]),
                  x_test=xtr[:2], y_test=np.array([1, 0]))
    ds = load_dataset(DatasetSpec(name="npz", path=str(p)))
    assert ds.train_x.shape == (4, 1, 5, 5) and ds.num_classes == 2
    assert np.array_equal(ds.train_x[:, 0].numpy(), np.round(xtr * 255).astype(np.uint8))


@pytest.mark.parametrize("fault", ["object", "float_range", "missing_key", "one_class",
                                   "negative", "float_labels", "nchw", "not_npz"])
def test_npz_rejections(tmp_path, fault):
    a = dict(x_train=RNG.integers(0, 256, (4, 5, 5, 1), dtype=np.uint8),
             y_train=np.array([0, 1, 1, 0]),
             x_test=RNG.integers(0, 256, (2, 5, 5, 1), dtype=np.uint8), y_test=np.array([1, 0]))
    if fault == "object":
        a["y_train"] = np.array([{"a": 1}, 1, 1, 0], dtype=object)
    elif fault == "float_range":
        a["x_train"] = np.full((4, 5, 5), 1.5, np.float32)
    elif fault == "missing_key":
        del a["y_test"]
    elif fault == "one_class":
        a["y_train"], a["y_test"] = np.zeros(4, int), np.zeros(2, int)
    elif fault == "negative":
        a["y_train"] = np.array([0, -1, 1, 0])
    elif fault == "float_labels":
        a["y_train"] = a["y_train"].astype(np.float32)
    elif fault == "nchw":
        a["x_train"] = RNG.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    p = write_npz(tmp_path / "d.npz", **a)
    if fault == "not_npz":
        p.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="d.npz"):
        load_dataset(DatasetSpec(name="npz", path=str(p)))


# ---------------------------------------------------------------------------------- roots
def test_missing_dataset_lists_every_place(tmp_path, monkeypatch):
    env_root, work = tmp_path / "env", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("BULWARK_DATA_ROOT", str(env_root))
    monkeypatch.chdir(work)
    explicit = tmp_path / "explicit"
    (explicit / "cifar-10-batches-py").mkdir(parents=True)
    dump(explicit / "cifar-10-batches-py" / "data_batch_1", cifar_dict(2, b"labels", 10))
    with pytest.raises(DataError) as e:
        load_dataset(DatasetSpec(name="cifar10", root=str(explicit)))
    msg = str(e.value)
    for root in resolve_data_root(str(explicit)):
        assert str(root / "cifar-10-batches-py") in msg
    assert "lacks data_batch_2" in msg and "test_batch" in msg
    assert "dataset.root" in msg and "BULWARK_DATA_ROOT" in msg and "download" in msg


def test_resolve_data_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("BULWARK_DATA_ROOT", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    roots = resolve_data_root(str(tmp_path / "x"))
    repo = Path(__file__).resolve().parent.parent
    assert roots == [tmp_path / "x", tmp_path / "env", tmp_path / "data", repo / "data"]
    assert BUNDLED_ROOT == repo / "data"
    monkeypatch.delenv("BULWARK_DATA_ROOT")
    assert resolve_data_root(None)[0] == tmp_path / "data"


def test_first_complete_root_wins_and_env_is_used(tmp_path, monkeypatch):
    arrays = make_idx_set(tmp_path / "env")
    (tmp_path / "work" / "data" / "fashion_mnist").mkdir(parents=True)  # incomplete copy
    monkeypatch.setenv("BULWARK_DATA_ROOT", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path / "work")
    ds = load_dataset(DatasetSpec(name="fashion_mnist"))
    assert np.array_equal(ds.test_x[:, 0].numpy(), arrays["t10k"][0])


def test_limits(tmp_path):
    arrays = make_idx_set(tmp_path, n=(30, 9))
    spec = DatasetSpec(name="fashion_mnist", root=str(tmp_path), train_limit=10, test_limit=4)
    a, b = load_dataset(spec), load_dataset(spec)
    assert a.train_x.shape[0] == 10 and a.test_x.shape[0] == 4
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert np.array_equal(a.test_x[:, 0].numpy(), arrays["t10k"][0][:4])
    full = arrays["train"][0].reshape(30, -1)
    picked = [int(np.flatnonzero((full == img.reshape(-1)).all(1))[0]) for img in a.train_x.numpy()]
    assert len(set(picked)) == 10 and picked != list(range(10))  # a shuffled subset
    assert a.train_y.tolist() == arrays["train"][1][picked].tolist()


# ---------------------------------------------------------------------------------- others
def test_digits():
    ds = load_dataset(DatasetSpec(name="digits"))
    assert len(ds.train_x) + len(ds.test_x) == 1797 and ds.num_classes == 10
    assert ds.train_x.shape[1:] == (1, 8, 8) and len(ds.test_x) == 359
    assert set(ds.train_y.unique().tolist()) == set(range(10))
    assert int(ds.train_x.max()) == 255
    x = ds.train_x.double() / 255
    assert ds.mean[0] == pytest.approx(float(x.mean())) and ds.std[0] == pytest.approx(
        float(x.std(unbiased=False)))
    assert torch.equal(load_dataset(DatasetSpec(name="digits")).test_y, ds.test_y)


def test_synthetic_seeded():
    s = SyntheticSpec(num_classes=3, image_size=12, channels=3, n_train=30, n_test=16, seed=5)
    a = load_dataset(DatasetSpec(name="synthetic", synthetic=s))
    b = load_dataset(DatasetSpec(name="synthetic", synthetic=s))
    c = load_dataset(DatasetSpec(name="synthetic", synthetic=s.model_copy(update={"seed": 6})))
    assert a.train_x.shape == (30, 3, 12, 12) and a.test_x.shape == (16, 3, 12, 12)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.num_classes == 3 and a.train_y.bincount().tolist() == [10, 10, 10]
    assert len(a.mean) == 3 and (a.crop_padding, a.flip) == (0, False)


def test_real_mnist_ships_and_is_found_with_no_root(tmp_path, monkeypatch):
    """No dataset.root, no $BULWARK_DATA_ROOT, an empty working directory: the bundled copy."""
    monkeypatch.delenv("BULWARK_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    ds = load_dataset(DatasetSpec(name="mnist"))
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (60000, 1, 28, 28)
    assert ds.test_x.shape == (10000, 1, 28, 28) and ds.test_y.shape == (10000,)
    assert ds.train_y.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918,
                                              6265, 5851, 5949]


# ---------------------------------------------------------------------------------- augment
def unique_images(b: int, c: int, h: int, w: int) -> torch.Tensor:
    n = b * c * h * w
    return (torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)).reshape(b, c, h, w)


def test_crop_is_the_padded_image_at_the_drawn_offset():
    x, p = unique_images(64, 2, 5, 6), 2
    out = augment(x, p, False, torch.Generator().manual_seed(3))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)))  # zeros around
    # the documented draws, replayed from the same seed
    off = torch.randint(0, 2 * p + 1, (2, 64), generator=torch.Generator().manual_seed(3))
    for i in range(64):
        dy, dx = int(off[0, i]), int(off[1, i])
        assert np.array_equal(out[i].numpy(), padded[i, :, dy:dy + 5, dx:dx + 6])
    assert len({(int(a), int(b)) for a, b in off.T}) > 10
    # a hand-written case: 3x3 image 1..9 shifted down-right by one (offset 0, 0)
    img = torch.arange(1, 10, dtype=torch.float32).reshape(1, 1, 3, 3) / 10
    for seed in range(50):
        o = torch.randint(0, 3, (2, 1), generator=torch.Generator().manual_seed(seed))
        if o.tolist() == [[0], [0]]:
            got = augment(img, 1, False, torch.Generator().manual_seed(seed))
            want = torch.tensor([[0, 0, 0], [0, 1, 2], [0, 4, 5]], dtype=torch.float32) / 10
            assert torch.equal(got[0, 0], want)
            break
    else:
        pytest.fail("no seed drew offset (0, 0)")


def test_flip_mirrors_exactly_and_is_seeded():
    x = unique_images(64, 3, 4, 5)
    out = augment(x, 0, True, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(out[i], x[i].flip(-1))) for i in range(64)]
    kept = [bool(torch.equal(out[i], x[i])) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each one or the other
    assert 10 < sum(flipped) < 54
    i = flipped.index(True)
    assert np.array_equal(out[i].numpy(), x[i].numpy()[..., ::-1])
    again = augment(x, 0, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_augment_seeded_and_in_range():
    x = torch.rand(32, 3, 8, 8)
    a = augment(x, 4, True, torch.Generator().manual_seed(7))
    b = augment(x, 4, True, torch.Generator().manual_seed(7))
    c = augment(x, 4, True, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(augment(x, 0, False, torch.Generator()), x)


# ---------------------------------------------------------------------------------- loader
def test_device_loader_covers_every_index_once():
    n = 103
    x = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 3, 3).contiguous()
    y = torch.arange(n)
    loader = DeviceLoader(x, y, 10, device="cpu")
    assert len(loader) == 11
    batches = list(loader.epoch(torch.Generator().manual_seed(0)))
    assert len(batches) == 11 and [len(b[1]) for b in batches] == [10] * 10 + [3]
    ys = torch.cat([b[1] for b in batches])
    assert sorted(ys.tolist()) == list(range(n)) and ys.tolist() != list(range(n))
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and torch.equal(xb[:, 0, 1, 1] * 255, yb.float())
    again = torch.cat([b[1] for b in loader.epoch(torch.Generator().manual_seed(0))])
    assert torch.equal(ys, again)
    drop = DeviceLoader(x, y, 10, device="cpu", drop_last=True)
    assert len(drop) == 10 and sum(len(b[1]) for b in drop.epoch(torch.Generator())) == 100
    plain = DeviceLoader(x, y, 50, device="cpu", shuffle=False)
    assert torch.cat([b[1] for b in plain.epoch(torch.Generator())]).tolist() == list(range(n))


def test_device_loader_augments_reproducibly():
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    loader = DeviceLoader(x, torch.arange(40), 16, device="cpu", crop_padding=2, flip=True)
    a = [b[0] for b in loader.epoch(torch.Generator().manual_seed(1))]
    b = [b[0] for b in loader.epoch(torch.Generator().manual_seed(1))]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert all(t.min() >= 0 and t.max() <= 1 for t in a)


# ---------------------------------------------------------------------------------- split
def test_split_validation():
    x = torch.arange(50, dtype=torch.uint8).reshape(50, 1, 1, 1)
    y = torch.arange(50)
    tx, ty, vx, vy = split_validation(x, y, 12, seed=3)
    assert len(tx) == len(ty) == 38 and len(vx) == len(vy) == 12
    assert set(ty.tolist()).isdisjoint(vy.tolist())
    assert sorted(ty.tolist() + vy.tolist()) == list(range(50))
    assert torch.equal(tx.flatten().long(), ty) and torch.equal(vx.flatten().long(), vy)
    assert torch.equal(split_validation(x, y, 12, seed=3)[3], vy)
    assert not torch.equal(split_validation(x, y, 12, seed=4)[3], vy)
    assert len(split_validation(x, y, 0, seed=0)[2]) == 0
    with pytest.raises(DataError):
        split_validation(x, y, 50, seed=0)


def test_mnist_checksums_match_the_real_files():
    """The digest table matches the shipped files, hashed here independently of the loader."""
    from bulwark.workers.engine.data import MNIST_SHA256

    for fname, digest in MNIST_SHA256.items():
        with gzip.open(BUNDLED_ROOT / "mnist" / f"{fname}.gz", "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, fname


def test_mnist_that_is_not_the_published_files_is_refused(tmp_path):
    """Well-formed idx files under mnist/ that are not the originals: refused, file named."""
    make_idx_set(tmp_path, "mnist")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: not the published file "
                                        r"\(sha256 [0-9a-f]{64}, expected ba8910"):
        load_dataset(DatasetSpec(name="mnist", root=str(tmp_path)))
    assert (tmp_path / "mnist" / "train-images-idx3-ubyte").exists()  # never deleted on load


def test_a_failed_download_says_where_it_looked_and_how_to_place_files(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BULWARK_DATA_ROOT", raising=False)
    with pytest.raises(DataError) as e:
        load_dataset(DatasetSpec(name="cifar10", root=str(tmp_path / "r"), download=True))
    msg = str(e.value)
    assert "download failed" in msg and "Name or service not known" in msg
    for root in resolve_data_root(str(tmp_path / "r")):
        assert str(root / "cifar-10-batches-py") in msg
    assert "Place the files by hand" in msg and "cifar-10-python.tar.gz" in msg
    assert not list((tmp_path / "r").rglob("*.part"))  # no half-written file left behind


def test_checksum_mismatch_is_refused_and_removed(tmp_path):
    import gzip
    import hashlib

    from bulwark.workers.engine.data import DataError, verify_checksums

    good, bad = b"\x00\x00\x08\x01" + b"\x00" * 8, b"tampered"
    (tmp_path / "a.gz").write_bytes(gzip.compress(good))
    (tmp_path / "b").write_bytes(bad)
    verify_checksums(tmp_path, {"a": hashlib.sha256(good).hexdigest()})
    with pytest.raises(DataError, match="checksum mismatch"):
        verify_checksums(tmp_path, {"b": hashlib.sha256(good).hexdigest()})
    assert not (tmp_path / "b").exists()
    with pytest.raises(DataError, match="missing"):
        verify_checksums(tmp_path, {"c": "0" * 64})
