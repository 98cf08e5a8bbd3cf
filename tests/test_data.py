"""Tests of vdm.data: every format is written here, small, in the exact real layout."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdm.data import (
    FASHION_MNIST_ROOT,
    DatasetError,
    PHOTO_NAMES,
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    downscale,
    embedded_photos,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_imagenet,
    load_mnist,
    photo_scales,
    photo_tiles,
    read_idx,
    restricted_loads,
    tile_image,
)

RNG = np.random.default_rng(1234)


def _raises_naming(path, fn, *args, match=None, **kw):
    with pytest.raises(DatasetError) as ei:
        fn(*args, **kw)
    assert str(path) in str(ei.value), str(ei.value)
    if match:
        assert match in str(ei.value), str(ei.value)
    return ei.value


# ------------------------------------------------------------------------- IDX

_IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
              np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    be = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    code = _IDX_CODES[np.dtype(be)]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(be).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_mnist_folder(root: Path, n_train=7, n_test=3, gz=True):
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    out = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = RNG.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{stem}-images-idx3-ubyte{sfx}", x, gz)
        write_idx(root / f"{stem}-labels-idx1-ubyte{sfx}", y, gz)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_round_trip(tmp_path, gz):
    ref = write_mnist_folder(tmp_path, gz=gz)
    for split in ("train", "test"):
        x, y = load_mnist(split, tmp_path, return_labels=True)
        assert x.shape == (len(ref[split][0]), 1, 28, 28) and x.dtype == np.uint8 and x.flags.c_contiguous
        np.testing.assert_array_equal(x[:, 0], ref[split][0])
        np.testing.assert_array_equal(y, ref[split][1])
        np.testing.assert_array_equal(load_dataset("mnist", split, root=tmp_path), x)
        np.testing.assert_array_equal(load_dataset("fashion_mnist", split, root=tmp_path), x)


@settings(max_examples=25, deadline=None)
@given(
    dtype=st.sampled_from(["u1", "i1", ">i2", ">i4", ">f4", ">f8"]),
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    gz=st.booleans(),
)
def test_idx_round_trip_any_dtype(tmp_path_factory, dtype, shape, gz):
    arr = (np.arange(int(np.prod(shape))) * 3 - 5).astype(dtype).reshape(shape)
    p = write_idx(tmp_path_factory.mktemp("idx") / "a.idx", arr, gz)
    back = read_idx(p)
    assert back.shape == tuple(shape) and back.dtype.isnative
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:-300], "truncated"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:3], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "type code"),
        (lambda b: b[:3] + b"\x00" + b[4:], "0 dimensions"),
        (lambda b: b[:3] + b"\x09" + b[4:], "truncated"),
    ],
)
def test_idx_malformed(tmp_path, gz, mutate, match):
    good = idx_bytes(RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8))
    bad = mutate(good)
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(gzip.compress(bad) if gz else bad)
    _raises_naming(p, read_idx, p, match=match)


def test_idx_truncated_gzip_stream(tmp_path):
    good = gzip.compress(idx_bytes(RNG.integers(0, 256, (50, 28, 28), dtype=np.uint8)))
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(good[: len(good) // 2])
    _raises_naming(p, read_idx, p)
    p.write_bytes(b"\x1f\x8b" + b"\x00" * 40)  # gzip magic, garbage after it
    _raises_naming(p, read_idx, p)


def test_mnist_inconsistent_files(tmp_path):
    write_mnist_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    _raises_naming(tmp_path / "train-labels-idx1-ubyte.gz", load_mnist, "train", tmp_path, return_labels=True,
                   match="labels for")
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), ">i4"))
    _raises_naming(tmp_path / "t10k-images-idx3-ubyte.gz", load_mnist, "test", tmp_path, match="uint8")
    os.remove(tmp_path / "train-images-idx3-ubyte.gz")
    _raises_naming("train-images-idx3-ubyte", load_mnist, "train", tmp_path, match="missing")


def test_fashion_mnist_missing_folder_says_how_to_install(tmp_path):
    e = _raises_naming(tmp_path / "nope", load_fashion_mnist, "train", tmp_path / "nope")
    assert "apt-get install dataset-fashion-mnist" in str(e)


def test_fashion_mnist_real_files():
    if not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not installed in {FASHION_MNIST_ROOT} (apt-get install dataset-fashion-mnist)")
    x, y = load_fashion_mnist("test", return_labels=True)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    assert load_dataset("fashion_mnist", "train").shape == (60000, 1, 28, 28)


# --------------------------------------------------------------------- CIFAR-10

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_batch(n: int, seed: int):
    r = np.random.default_rng(seed)
    return {
        b"batch_label": b"training batch",
        b"labels": r.integers(0, 10, n).tolist(),
        b"data": r.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x_%d.png" % i for i in range(n)],
    }


def write_cifar(root: Path, protocol=2) -> dict:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for i, name in enumerate(CIFAR_BATCHES):
        b = cifar_batch(4 + i, i)
        with open(d / name, "wb") as f:
            pickle.dump(b, f, protocol=protocol)
        batches[name] = b
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_folder_round_trip(tmp_path, protocol):
    batches = write_cifar(tmp_path, protocol)
    x, y = load_cifar10("train", tmp_path, return_labels=True)
    data = np.concatenate([batches[n][b"data"] for n in CIFAR_BATCHES[:5]])
    assert x.shape == (len(data), 3, 32, 32) and x.dtype == np.uint8 and x.flags.c_contiguous
    # channel-major rows: first 1024 bytes are the red plane, row by row
    np.testing.assert_array_equal(x[0, 0], data[0, :1024].reshape(32, 32))
    np.testing.assert_array_equal(x[0, 2, 31, 31], data[0, 3071])
    np.testing.assert_array_equal(x.reshape(len(x), -1), data)
    assert y.tolist() == sum((batches[n][b"labels"] for n in CIFAR_BATCHES[:5]), [])
    t = load_dataset("cifar10", "test", root=tmp_path / "cifar-10-batches-py")
    np.testing.assert_array_equal(t.reshape(len(t), -1), batches["test_batch"][b"data"])


def test_cifar_tarball(tmp_path):
    batches = write_cifar(tmp_path / "src")
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for root in (tgz, tmp_path):
        t = load_dataset("cifar10", "test", root=root)
        np.testing.assert_array_equal(t.reshape(len(t), -1), batches["test_batch"][b"data"])
    assert load_cifar10("train", tgz).shape == (4 + 5 + 6 + 7 + 8, 3, 32, 32)
    raw = tgz.read_bytes()
    tgz.write_bytes(raw[: len(raw) // 2])
    _raises_naming(tgz, load_cifar10, "train", tgz)


def py2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch byte for byte as Python 2's cPickle wrote CIFAR-10 (protocol 2, str
    keys, ``numpy.core.multiarray._reconstruct``), written by hand."""

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    n, m = data.shape
    arr = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
        + b"(K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", m) + b"\x86"
        + b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89" + s(data.tobytes()) + b"tb"
    )
    labs = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + arr + s(b"labels") + labs + s(b"batch_label") + s(b"testing batch 1 of 1") + b"u."


def test_cifar_python2_pickle(tmp_path):
    write_cifar(tmp_path)
    data = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(py2_cifar_pickle(data, [3, 1, 4]))
    x, y = load_cifar10("test", tmp_path, return_labels=True)
    np.testing.assert_array_equal(x.reshape(3, -1), data)
    assert y.tolist() == [3, 1, 4]


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar_refuses_malicious_pickle(tmp_path):
    write_cifar(tmp_path)
    target = str(tmp_path / "pwned")
    evil = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(evil, "wb") as f:
        pickle.dump({b"data": _Evil(target), b"labels": []}, f)
    e = _raises_naming(evil, load_cifar10, "test", tmp_path, match="refused")
    assert "mkdir" in str(e)
    assert not os.path.exists(target)
    for payload in (pickle.dumps(_Evil(target)), b"cos\nsystem\n(S'echo pwned'\ntR."):
        with pytest.raises(pickle.UnpicklingError, match="refused global"):
            restricted_loads(payload)
    assert not os.path.exists(target)
    # only the ndarray-building globals pass: builtins / numpy functions are refused
    for mod, name in (("builtins", "eval"), ("numpy", "load"), ("numpy.testing", "assert_equal"), ("_codecs", "decode")):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            restricted_loads(f"c{mod}\n{name}\n.".encode())
    with pytest.raises(pickle.UnpicklingError):
        restricted_loads(b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-50]), "pickle"),
        (lambda p: p.write_bytes(b"not a pickle at all"), "pickle"),
        (lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), "dict"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]})), "3072"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]})), "uint8"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})), "labels"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})), "labels"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_cifar_malformed(tmp_path, mutate, match):
    write_cifar(tmp_path)
    p = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    mutate(p)
    where = tmp_path if match == "missing" else p
    _raises_naming(where, load_cifar10, "train", tmp_path, match=match)


# ------------------------------------------------------------ downsampled ImageNet


@pytest.mark.parametrize("size", [32, 64])
def test_imagenet_npz_round_trip(tmp_path, size):
    row = 3 * size * size
    parts = {}
    for k in (1, 2, 10):  # numeric, not lexical, order: 1, 2, 10
        parts[k] = (RNG.integers(0, 256, (3, row), dtype=np.uint8), RNG.integers(1, 1001, 3))
        np.savez(tmp_path / f"train_data_batch_{k}.npz", data=parts[k][0], labels=parts[k][1], mean=np.zeros(row))
    val = RNG.integers(0, 256, (2, row), dtype=np.uint8)
    np.savez_compressed(tmp_path / "val_data.npz", data=val, labels=np.array([5, 7]))
    x, y = load_imagenet("train", tmp_path, size, return_labels=True)
    ref = np.concatenate([parts[k][0] for k in (1, 2, 10)])
    assert x.shape == (9, 3, size, size) and x.flags.c_contiguous
    np.testing.assert_array_equal(x.reshape(9, -1), ref)
    np.testing.assert_array_equal(x[0, 1], ref[0, size * size : 2 * size * size].reshape(size, size))
    assert y.tolist() == np.concatenate([parts[k][1] for k in (1, 2, 10)]).tolist()
    name = f"imagenet{size}"
    np.testing.assert_array_equal(load_dataset(name, "test", root=tmp_path).reshape(2, -1), val)
    np.testing.assert_array_equal(load_dataset(name, "val", root=tmp_path / "val_data.npz").reshape(2, -1), val)
    # one file serves only its own split: a training batch is never evaluated as test data
    _raises_naming(tmp_path / "train_data_batch_1.npz", load_dataset, name, "test",
                   root=tmp_path / "train_data_batch_1.npz", match="val_data")
    other = 64 if size == 32 else 32
    _raises_naming(tmp_path / "val_data.npz", load_imagenet, "test", tmp_path, other, match="uint8")


def test_imagenet_malformed(tmp_path):
    p = tmp_path / "train_data_batch_1.npz"
    np.savez(p, data=np.empty((2,), dtype=object), labels=np.zeros(2))
    _raises_naming(p, load_dataset, "imagenet32", "train", root=tmp_path)  # object arrays: never unpickled
    np.savez(p, data=RNG.integers(0, 256, (4, 3072), dtype=np.uint8), labels=np.zeros(4, int))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    _raises_naming(p, load_dataset, "imagenet32", "train", root=tmp_path)
    np.savez(p, images=np.zeros((1, 3072), np.uint8))
    _raises_naming(p, load_dataset, "imagenet32", "train", root=tmp_path, match="'data'")
    _raises_naming(tmp_path, load_dataset, "imagenet32", "test", root=tmp_path, match="val_data")


# ------------------------------------------------------------------ image folders


def test_image_folder(tmp_path):
    from PIL import Image

    rgb = RNG.integers(0, 256, (40, 70, 3), dtype=np.uint8)  # 1 x 2 tiles of 32
    grey = RNG.integers(0, 256, (33, 33), dtype=np.uint8)  # 1 tile
    tiny = RNG.integers(0, 256, (10, 10, 3), dtype=np.uint8)  # none
    (tmp_path / "sub").mkdir()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(grey).save(tmp_path / "sub" / "b.PNG")
    Image.fromarray(tiny).save(tmp_path / "c.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_dataset("folder", "all", root=tmp_path)
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8 and x.flags.c_contiguous
    np.testing.assert_array_equal(x[0].transpose(1, 2, 0), rgb[:32, :32])
    np.testing.assert_array_equal(x[1].transpose(1, 2, 0), rgb[:32, 32:64])
    for c in range(3):  # grey replicated to RGB
        np.testing.assert_array_equal(x[2, c], grey[:32, :32])
    g = load_image_folder(tmp_path, image_size=16, channels=1)
    assert g.shape == (4 * 2 + 4 + 0, 1, 16, 16)
    np.testing.assert_array_equal(g[-1, 0], grey[16:32, 16:32])
    _raises_naming(tmp_path / "train", load_dataset, "folder", "train", root=tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    _raises_naming(tmp_path / "bad.png", load_dataset, "folder", "all", root=tmp_path)


def test_image_folder_splits_and_16bit(tmp_path):
    from PIL import Image

    (tmp_path / "test").mkdir()
    a16 = np.full((32, 32), 65535, np.uint16)
    a16[0, 0] = 0
    Image.fromarray(a16).save(tmp_path / "test" / "deep.png")
    x = load_dataset("folder", "test", root=tmp_path, channels=1)
    assert x.shape == (1, 1, 32, 32) and x[0, 0, 0, 0] == 0 and x[0, 0, 1, 1] == 255
    _raises_naming(tmp_path / "test", load_dataset, "folder", "test", root=tmp_path, image_size=64, match="at least")


# ------------------------------------------------------------- embedded photos


@pytest.fixture(scope="module")
def tiles():
    return {s: photo_tiles(s, return_info=True) for s in ("train", "test")}


def test_photo_split_is_by_photo_and_shares_no_tile(tiles):
    assert set(TRAIN_PHOTOS).isdisjoint(TEST_PHOTOS)
    assert set(TRAIN_PHOTOS) | set(TEST_PHOTOS) == set(PHOTO_NAMES) and len(PHOTO_NAMES) == 11
    names = {s: {i[0] for i in tiles[s][1]} for s in tiles}
    assert names["train"] == set(TRAIN_PHOTOS) and names["test"] == set(TEST_PHOTOS)
    hashes = {s: {hashlib.sha256(t.tobytes()).hexdigest() for t in tiles[s][0]} for s in tiles}
    assert hashes["train"].isdisjoint(hashes["test"])
    assert set(embedded_photos("test")) == set(TEST_PHOTOS)
    assert set(embedded_photos("train")) == set(TRAIN_PHOTOS)


def test_photo_tiles_shape_counts_and_flat_filter(tiles):
    x, info = tiles["train"]
    assert x.shape == (2133, 3, 32, 32) and x.dtype == np.uint8 and x.flags.c_contiguous
    assert tiles["test"][0].shape == (1826, 3, 32, 32)
    assert len(info) == len(x)
    for s in tiles:
        assert tiles[s][0].reshape(len(tiles[s][0]), -1).std(axis=1).min() >= 4.0
    per_photo = {n: sum(i[0] == n for i in info) for n in TRAIN_PHOTOS}
    assert max(per_photo.values()) == 500  # the cap (retina, hubble)
    uncapped = photo_tiles("train", max_tiles_per_photo=None)
    assert len(uncapped) == 4304
    # a tile is where info says it is
    name, k, y0, x0 = info[-1]
    src = downscale(np.asarray(embedded_photos("train")[name]), k)
    np.testing.assert_array_equal(x[-1].transpose(1, 2, 0), src[y0 : y0 + 32, x0 : x0 + 32])


def test_photo_tiles_deterministic(tiles):
    a = load_dataset("photos", "test")
    np.testing.assert_array_equal(a, tiles["test"][0])
    assert hashlib.sha256(a.tobytes()).hexdigest() == hashlib.sha256(photo_tiles("test").tobytes()).hexdigest()
    small = load_dataset("photos", "train", image_size=16)
    assert small.shape[1:] == (3, 16, 16) and len(small) > 0


def test_embedded_photos_full_size():
    p = embedded_photos("test")
    assert list(p) == list(TEST_PHOTOS)
    assert p["coffee"].shape == (400, 600, 3) and p["rocket"].shape == (427, 640, 3)
    assert p["flower"].shape == (427, 640, 3) and p["motorcycle_left"].shape == (500, 741, 3)
    assert all(v.dtype == np.uint8 and v.ndim == 3 for v in p.values())
    assert not np.array_equal(p["motorcycle_left"], p["motorcycle_right"])
    with pytest.raises(ValueError):
        p["coffee"][0, 0, 0] = 1  # shared, read-only


def test_downscale_and_tile_exact():
    img = RNG.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    d = downscale(img, 2)
    assert d.shape == (4, 6, 3)
    s = img[:8, :12].astype(int)
    ref = (s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2) // 4
    np.testing.assert_array_equal(d, ref)
    d4 = downscale(img, 4)
    np.testing.assert_array_equal(d4[1, 2], (img[4:8, 8:12].astype(int).sum(axis=(0, 1)) + 8) // 16)
    t = tile_image(img, 4)
    assert t.shape == (2 * 3, 4, 4, 3)
    np.testing.assert_array_equal(t[4], img[4:8, 4:8])


# ------------------------------------------------------------------ entry point


def test_load_dataset_arguments(tmp_path):
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn", "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("photos", "validation")
    with pytest.raises(ValueError, match="28x28"):
        load_dataset("mnist", "train", root=tmp_path, image_size=32)
    with pytest.raises(DatasetError):
        load_dataset("cifar10", "train")  # no root
    _raises_naming(tmp_path / "none", load_dataset, "cifar10", "train", root=tmp_path / "none")
    _raises_naming(tmp_path, load_dataset, "cifar10", "train", root=tmp_path, match="cifar-10-python.tar.gz")


def test_data_modules_do_not_import_torch():
    import vdm.data

    for f in Path(vdm.data.__file__).parent.glob("*.py"):
        src = f.read_text()
        assert "import torch" not in src and "from torch" not in src, f


# ------------------------------------------------------------------ Debian wallpapers
def test_wallpapers_recipe_on_stand_in_packages(tmp_path, monkeypatch):
    """The recipe on stand-in package folders: the largest Plasma size is read, each photo is box-averaged by
    the factors that keep its short side ≥ MIN_SHORT_SIDE, flat tiles are dropped, splits share no photo."""
    from PIL import Image
    from vdm.data import wallpapers as wp

    mate, plasma = tmp_path / "mate", tmp_path / "plasma"
    mate.mkdir()
    rng = np.random.default_rng(0)
    monkeypatch.setattr(wp, "PACKAGES", {"mate-backgrounds": mate, "plasma-workspace-wallpapers": plasma})
    wp._photo.cache_clear()
    images = {}
    for name, (package, rel, _, _) in wp.WALLPAPERS.items():
        img = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
        images[name] = img
        if package == "mate-backgrounds":
            Image.fromarray(img).save(mate / rel.replace(".jpg", ".png"))
            (mate / rel).write_bytes((mate / rel.replace(".jpg", ".png")).read_bytes())
        else:
            folder = plasma / rel / "contents" / "images"
            folder.mkdir(parents=True)
            Image.fromarray(img).save(folder / "600x400.png")
            Image.fromarray(img[:100, :150]).save(folder / "150x100.png")  # smaller: not used
    try:
        test = wp.wallpaper_tiles("test")
        # 400×600 at factors 2 (200×300 ≥ 192) only: 6×9 tiles per photo, none flat
        assert test.shape == (len(wp.TEST_WALLPAPERS) * 54, 3, 32, 32)
        first = downscale(images[wp.TEST_WALLPAPERS[0]], 2)[:32, :32].transpose(2, 0, 1)
        np.testing.assert_array_equal(test[0], first)
        assert not set(wp.TRAIN_WALLPAPERS) & set(wp.TEST_WALLPAPERS)
        assert len(wp.TRAIN_WALLPAPERS) + len(wp.TEST_WALLPAPERS) == len(wp.WALLPAPERS)
        # the same scales whole, for random crops; photos+wallpapers = the embedded photos, then these
        scales = photo_scales("wallpapers", "test")
        assert list(scales) == list(wp.TEST_WALLPAPERS)
        np.testing.assert_array_equal(scales[wp.TEST_WALLPAPERS[0]][0], downscale(images[wp.TEST_WALLPAPERS[0]], 2))
        both = photo_scales("photos+wallpapers", "test")
        assert list(both) == list(TEST_PHOTOS) + list(wp.TEST_WALLPAPERS)
        np.testing.assert_array_equal(both["coffee"][1], downscale(embedded_photos("test")["coffee"], 2))
        np.testing.assert_array_equal(load_dataset("photos+wallpapers", "test"),
                                      np.concatenate([photo_tiles("test"), test]))
    finally:
        wp._photo.cache_clear()


def test_wallpapers_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    from vdm.data import wallpapers as wp

    monkeypatch.setattr(wp, "PACKAGES", {"mate-backgrounds": tmp_path / "m", "plasma-workspace-wallpapers": tmp_path})
    wp._photo.cache_clear()
    try:
        with pytest.raises(DatasetError, match="apt-get install mate-backgrounds"):
            load_dataset("wallpapers", "test")
    finally:
        wp._photo.cache_clear()
