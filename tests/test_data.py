"""bench.core.data: offline datasets, IDX/CIFAR parsing on tiny fake files, downloads, augmentation."""

import collections
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from bench.core import data
from bench.core.data import Dataset, augment_batch, eval_indices, load_dataset
from bench.core.errors import BenchError

T10K = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
SHARED_T10K = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, stem: str, array: np.ndarray, gz: bool, monkeypatch=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (stem + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(idx_bytes(array)) if gz else idx_bytes(array))
    if gz and monkeypatch is not None:
        monkeypatch.setitem(data.MD5, path.name, md5(path))
    return path


def fake_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (n, 2, 3)).astype(np.uint8), rng.randint(0, 10, n).astype(np.uint8)


@pytest.fixture
def offline(monkeypatch):
    """Every download attempt fails as it does without internet; records the URLs tried."""
    tried = []

    def urlopen(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tried


# ---------------------------------------------------------------- registry and offline datasets


def test_unknown_dataset_suggests_close_name():
    with pytest.raises(BenchError, match="Did you mean 'mnist'") as info:
        load_dataset("minst")
    for name in ("cifar10", "cifar100", "digits", "mnist", "mnist_t10k", "synthetic"):
        assert name in str(info.value)


def test_unknown_option_names_accepted_ones():
    with pytest.raises(BenchError, match="n_train") as info:
        load_dataset("synthetic", n_trian=10)
    assert "'n_trian'" in str(info.value)
    with pytest.raises(BenchError, match="Accepted: none"):
        load_dataset("digits", n_train=10)


def test_digits_split():
    ds = load_dataset("digits")
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (1257, 180, 360)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10 and ds.augment == "none"
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert 0 <= ds.train_x.min() and ds.train_x.max() <= 1 and ds.train_x.max() == 1
    assert set(ds.test_y.tolist()) == set(range(10))
    # the splits partition the data set: every (image, label) pair used exactly as often as it occurs
    bunch = load_digits()
    full = collections.Counter((img.astype(np.float32).tobytes(), int(t)) for img, t in zip(bunch.images / 16, bunch.target))
    parts = collections.Counter((x[0].numpy().tobytes(), int(y)) for x, y in zip(
        torch.cat([ds.train_x, ds.val_x, ds.test_x]), torch.cat([ds.train_y, ds.val_y, ds.test_y])))
    assert parts == full
    again = load_dataset("digits")
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)
    # the documented normalization constants are the train split's statistics
    assert ds.train_x.mean().item() == pytest.approx(ds.mean[0], abs=1e-3)
    assert ds.train_x.std().item() == pytest.approx(ds.std[0], abs=1e-3)


def test_synthetic_is_learnable_and_seeded():
    ds = load_dataset("synthetic")
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (256, 64, 128)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 4 and ds.default_threat.eps == 0.1
    assert 0 <= ds.train_x.min() and ds.train_x.max() <= 1
    centroids = torch.stack([ds.train_x[ds.train_y == c].mean(0) for c in range(4)]).flatten(1)
    pred = torch.cdist(ds.test_x.flatten(1), centroids).argmin(1)
    assert (pred == ds.test_y).float().mean() > 0.8
    assert torch.equal(load_dataset("synthetic").train_x, ds.train_x)
    assert not torch.equal(load_dataset("synthetic", seed=1).train_x, ds.train_x)
    other = load_dataset("synthetic", n_train=10, num_classes=3, shape=[3, 4, 5])
    assert other.train_x.shape == (10, 3, 4, 5) and other.mean == (0.5,) * 3 and other.train_y.max() < 3
    with pytest.raises(BenchError, match="shape"):
        load_dataset("synthetic", shape=(8, 8))


def test_to_moves_every_tensor_and_repr_is_short():
    ds = load_dataset("synthetic").to("cpu")
    assert isinstance(ds, Dataset) and ds.train_x.device.type == "cpu"
    assert "tensor" not in repr(ds)


def test_import_does_not_pull_torchvision():
    code = "import sys, bench.core.data; assert 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------- MNIST IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, monkeypatch, gz, offline):
    (train_x, train_y), (test_x, test_y) = fake_mnist(1100), fake_mnist(50, seed=1)
    folder = tmp_path / "mnist"  # the mnist/ subfolder of data_dir is searched too
    write_idx(folder, "train-images-idx3-ubyte", train_x, gz, monkeypatch)
    write_idx(folder, "train-labels-idx1-ubyte", train_y, gz, monkeypatch)
    write_idx(folder, T10K[0], test_x, gz, monkeypatch)
    write_idx(folder, T10K[1], test_y, gz, monkeypatch)
    ds = load_dataset("mnist", data_dir=str(tmp_path))
    assert not offline
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (100, 1000, 50)
    assert ds.input_shape == (1, 2, 3) and ds.mean == (0.1307,) and ds.default_threat.eps == 0.3
    assert torch.equal(ds.test_x[:, 0], torch.from_numpy(test_x).float() / 255)
    assert torch.equal(ds.test_y, torch.from_numpy(test_y).long())
    # train + val is exactly the training file, labels kept with their images
    got = sorted(zip(torch.cat([ds.train_x, ds.val_x]).flatten(1).mul(255).round().byte().numpy().tolist(),
                     torch.cat([ds.train_y, ds.val_y]).tolist()))
    assert got == sorted(zip(train_x.reshape(1100, -1).tolist(), train_y.tolist()))
    assert ("md5" in ds.source) == gz and "1000 val" in ds.source


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_t10k_split(tmp_path, monkeypatch, gz, offline):
    x, y = fake_mnist(10000)
    write_idx(tmp_path, T10K[0], x, gz, monkeypatch)
    write_idx(tmp_path, T10K[1], y, gz, monkeypatch)
    ds = load_dataset("mnist_t10k", data_dir=str(tmp_path))
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (7500, 500, 2000)
    assert torch.equal(ds.test_x[:, 0], torch.from_numpy(x[8000:]).float() / 255)
    assert torch.equal(ds.test_y, torch.from_numpy(y[8000:]).long())
    assert not offline  # the train files are never requested


def test_bad_magic_names_the_file(tmp_path, offline):
    x, y = fake_mnist(10000)
    write_idx(tmp_path, T10K[0], x, gz=False)
    (tmp_path / T10K[1]).write_bytes(b"\x00\x00\x08\x03" + idx_bytes(y)[4:])
    with pytest.raises(BenchError, match=f"{T10K[1]}.*magic number 0x803, expected 0x801"):
        load_dataset("mnist_t10k", data_dir=str(tmp_path))


def test_truncated_idx_names_the_file(tmp_path, offline):
    x, y = fake_mnist(10000)
    (tmp_path / T10K[0]).write_bytes(idx_bytes(x)[:-7])
    write_idx(tmp_path, T10K[1], y, gz=False)
    with pytest.raises(BenchError, match=f"{T10K[0]}.*truncated"):
        load_dataset("mnist_t10k", data_dir=str(tmp_path))


def test_image_label_count_mismatch(tmp_path, offline):
    x, y = fake_mnist(10000)
    write_idx(tmp_path, T10K[0], x, gz=False)
    write_idx(tmp_path, T10K[1], y[:-1], gz=False)
    with pytest.raises(BenchError, match="do not form an MNIST split"):
        load_dataset("mnist_t10k", data_dir=str(tmp_path))


@pytest.mark.skipif(not SHARED_T10K.is_dir(), reason="no offline copy of the MNIST test set on this machine")
def test_real_mnist_t10k(offline):
    ds = load_dataset("mnist_t10k", data_dir=str(SHARED_T10K), download=False)
    assert len(ds.train_x) + len(ds.val_x) == 8000 and len(ds.test_x) == 2000
    assert ds.input_shape == (1, 28, 28) and ds.train_x.max() == 1 and ds.train_x.min() == 0
    assert "verified" in ds.source
    counts = torch.bincount(ds.test_y, minlength=10)
    assert counts.min() > 150


# ---------------------------------------------------------------- missing files, checksums, downloads


def test_offline_missing_files_is_one_clear_error(tmp_path, offline):
    with pytest.raises(BenchError) as info:
        load_dataset("mnist", data_dir=str(tmp_path / "data"))
    msg = str(info.value)
    for part in ("'mnist'", "train-images-idx3-ubyte.gz", str(tmp_path / "data"), "URLError",
                 "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz", "--data-dir"):
        assert part in msg
    assert len(offline) == 2  # both mirrors of the first file, then it stops
    assert not (tmp_path / "data").exists()


def test_download_disabled(tmp_path, offline):
    with pytest.raises(BenchError, match=r"download=False.*cifar-10-python\.tar\.gz.*--data-dir"):
        load_dataset("cifar10", data_dir=str(tmp_path), download=False)
    assert not offline


def test_default_data_dir_from_environment(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path))
    with pytest.raises(BenchError, match=str(tmp_path)):
        load_dataset("cifar100", download=False)


def test_checksum_mismatch(tmp_path, offline):
    x, y = fake_mnist(10000)
    write_idx(tmp_path, T10K[0], x, gz=True)
    write_idx(tmp_path, T10K[1], y, gz=True)
    with pytest.raises(BenchError) as info:
        load_dataset("mnist_t10k", data_dir=str(tmp_path))
    msg = str(info.value)
    assert "9fb629c4189551a2d022fa330f9573f3" in msg and md5(tmp_path / (T10K[0] + ".gz")) in msg
    assert "delete it and download it again" in msg


def serve(monkeypatch, files: dict[str, bytes], fail_after: int | None = None) -> list[str]:
    """Patch urlopen to serve `files` by name (optionally breaking after `fail_after` bytes)."""
    tried = []

    class Response(io.BytesIO):
        def read(self, n=-1):
            if fail_after is not None and self.tell() >= fail_after:
                raise ConnectionResetError("connection reset by peer")
            return super().read(n if fail_after is None else 100)

    def urlopen(url, timeout=None):
        tried.append(url)
        name = url.rsplit("/", 1)[1]
        if name not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return Response(files[name])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return tried


def test_download_then_load(tmp_path, monkeypatch):
    x, y = fake_mnist(10000)
    blobs = {T10K[0] + ".gz": gzip.compress(idx_bytes(x)), T10K[1] + ".gz": gzip.compress(idx_bytes(y))}
    for name, blob in blobs.items():
        monkeypatch.setitem(data.MD5, name, hashlib.md5(blob).hexdigest())
    tried = serve(monkeypatch, blobs)
    ds = load_dataset("mnist_t10k", data_dir=str(tmp_path / "data"))
    assert len(ds.test_x) == 2000
    assert sorted(os.listdir(tmp_path / "data")) == sorted(blobs)
    assert all(url.startswith(data.MNIST_URLS[0]) for url in tried)


def test_interrupted_or_corrupt_download_leaves_no_file(tmp_path, monkeypatch):
    blob = gzip.compress(idx_bytes(fake_mnist(10000)[0]))
    monkeypatch.setitem(data.MD5, T10K[0] + ".gz", hashlib.md5(blob).hexdigest())
    serve(monkeypatch, {T10K[0] + ".gz": blob}, fail_after=1000)
    with pytest.raises(BenchError, match="ConnectionResetError"):
        load_dataset("mnist_t10k", data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    serve(monkeypatch, {T10K[0] + ".gz": blob[:-10]})
    with pytest.raises(BenchError, match="md5"):
        load_dataset("mnist_t10k", data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- CIFAR archives


CIFAR_LAYOUTS = {  # archive, folder, training batches (images each), test batch, meta file, label key, classes
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", b"labels", 10),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", "meta", b"fine_labels", 100),
}


def fake_cifar(tmp_path: Path, dataset: str = "cifar10", n_train: int = 1100, n_test: int = 20, payload=None):
    """A tarball and folder with the real layout (pickled with protocol 2, bytes keys); returns
    the archive path and the test batch."""
    archive_name, folder_name, train_files, test_file, meta, label_key, classes = CIFAR_LAYOUTS[dataset]
    rng = np.random.RandomState(0)
    folder = tmp_path / folder_name
    folder.mkdir()
    for name in [*train_files, test_file]:
        n = n_test if name == test_file else n_train // len(train_files)
        batch = {b"batch_label": name.encode(), b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
                 label_key: rng.randint(0, classes, n).tolist(), b"coarse_labels": [0] * n, b"filenames": [b"x.png"] * n}
        if payload is not None:
            batch[b"extra"] = payload
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / meta).write_bytes(pickle.dumps({b"label_names": [b"airplane"] * classes}, protocol=2))
    archive = tmp_path / archive_name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    test = pickle.loads((folder / test_file).read_bytes(), encoding="bytes")
    return archive, test[b"data"], test[label_key]


@pytest.mark.parametrize("dataset,form", [("cifar10", "tarball"), ("cifar10", "folder"), ("cifar100", "tarball")])
def test_fake_cifar(tmp_path, monkeypatch, offline, dataset, form):
    archive, test_data, test_labels = fake_cifar(tmp_path, dataset)
    monkeypatch.setitem(data.MD5, archive.name, md5(archive))
    if form == "folder":
        archive.unlink()
    else:
        shutil.rmtree(tmp_path / CIFAR_LAYOUTS[dataset][1])
    ds = load_dataset(dataset, data_dir=str(tmp_path))
    assert (len(ds.train_x), len(ds.val_x), len(ds.test_x)) == (100, 1000, 20)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == CIFAR_LAYOUTS[dataset][6] and ds.augment == "crop_flip"
    assert ds.default_threat.eps == pytest.approx(8 / 255) and len(ds.mean) == 3
    assert torch.equal(ds.test_x, torch.from_numpy(test_data).view(-1, 3, 32, 32).float() / 255)
    assert ds.test_y.tolist() == test_labels and ds.test_y.dtype == torch.int64
    assert ("verified" in ds.source) == (form == "tarball")


class _Evil:
    def __reduce__(self):
        return (os.getpid, ())


def test_cifar_pickle_refuses_code(tmp_path, monkeypatch, offline):
    archive, _, _ = fake_cifar(tmp_path, n_train=5, n_test=1, payload=_Evil())
    archive.unlink()
    with pytest.raises(BenchError, match="refusing to load posix.getpid"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_checksum_mismatch(tmp_path, offline):
    fake_cifar(tmp_path, n_train=5, n_test=1)
    with pytest.raises(BenchError, match="c58f30108f718f92721af3b95e74349a.*delete it"):
        load_dataset("cifar10", data_dir=str(tmp_path))


# ---------------------------------------------------------------- augmentation and evaluation subsets


def test_augment_none_is_identity():
    x = torch.rand(4, 3, 8, 8)
    assert augment_batch(x, "none") is x
    with pytest.raises(BenchError, match="crop_flip"):
        augment_batch(x, "cutout")


def test_crop_flip_is_a_padded_crop_or_its_mirror():
    x = torch.rand(16, 3, 10, 12)
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    kinds = set()
    for i in range(len(x)):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, dy:dy + 10, dx:dx + 12]))]
        assert matches, f"sample {i} is not a crop/flip of its input"
        kinds.add(matches[0][2])
        kinds.add("moved" if matches[0][:2] != (4, 4) else "centered")
    assert {True, False, "moved"} <= kinds


def test_crop_flip_is_deterministic_given_the_generator():
    x = torch.rand(32, 1, 8, 8)
    a = augment_batch(x, "crop_flip", torch.Generator().manual_seed(3))
    b = augment_batch(x, "crop_flip", torch.Generator().manual_seed(3))
    c = augment_batch(x, "crop_flip", torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != x).flatten(1).any(1).sum() > 16


def test_eval_indices():
    idx = eval_indices(1000, 100, seed=0)
    assert len(idx) == 100 and idx == sorted(set(idx)) and all(0 <= i < 1000 for i in idx)
    assert idx == eval_indices(1000, 100, seed=0) and idx != eval_indices(1000, 100, seed=1)
    assert set(eval_indices(1000, 50)) <= set(idx)
    assert eval_indices(10, None) == eval_indices(10, 10) == eval_indices(10, 99) == list(range(10))
    with pytest.raises(BenchError, match=">= 1"):
        eval_indices(10, 0)
