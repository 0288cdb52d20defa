"""Registered datasets, held as whole tensors in pixel space [0, 1], NCHW (airbench style).

A loader function's name is its registry key; each returns a `Dataset` with a fixed train /
validation / test split (the validation split is held out from the training data for early
stopping, Rice et al. 2020). Seeded splits use NumPy's legacy `RandomState`, whose stream is
frozen by NumPy's compatibility policy, so a split never changes between versions.

Files are read from `data_dir` (default: `$BENCH_DATA_DIR` or `./data`); official archives are
MD5-checked, and missing ones are downloaded when allowed. Offline, a missing file is one
`BenchError` that says which files, where, and how to provide them with `--data-dir`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import io
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.config import resolve_params
from bench.core.errors import BenchError
from bench.core.registry import Registry
from bench.core.threat import ThreatModel

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register

DIGITS_THREAT = ThreatModel("Linf", 0.2)
MNIST_THREAT = ThreatModel("Linf", 0.3)
CIFAR_THREAT = ThreatModel("Linf", 8 / 255)
SYNTHETIC_THREAT = ThreatModel("Linf", 0.1)

MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
CIFAR_URLS = ("https://www.cs.toronto.edu/~kriz/",)
DOWNLOAD_TIMEOUT = 30  # seconds per connection attempt

# Official checksums of the downloadable files; tests point entries at fake archives.
MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
}

AUGMENTATIONS = ("none", "crop_flip")
CROP_PADDING = 4
SPLIT_SEED = 0
DIGITS_TEST, DIGITS_VAL = 360, 180
MNIST_VAL = 1000
T10K_TRAIN, T10K_VAL = 8000, 500  # first 8,000 t10k images train (500 of them validation), last 2,000 test
CIFAR_VAL = 1000


@dataclass(eq=False)
class Dataset:
    """Pixels float32 in [0, 1] (NCHW), labels int64; `mean`/`std` go into the model's first layer,
    `augment` names the training augmentation, `source` records files, checksums and split."""

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    val_x: torch.Tensor = field(repr=False)
    val_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor = field(repr=False)
    test_y: torch.Tensor = field(repr=False)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    default_threat: ThreatModel
    source: str
    options: dict = field(default_factory=dict)  # the loader's options, defaults filled in (part of the identity)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device) -> "Dataset":
        """A copy with every tensor on `device`."""
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in _TENSOR_FIELDS})


_TENSOR_FIELDS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def load_dataset(name: str, data_dir: str | None = None, download: bool = True, **options) -> Dataset:
    """Load a registered dataset; unknown names and options are BenchErrors."""
    resolved = dataset_options(name, options)
    data = DATASETS.get(name)(data_dir=data_dir, download=download, **resolved)
    return dataclasses.replace(data, options=resolved)


def dataset_options(name: str, options: dict) -> dict:
    """The dataset's options with defaults filled in; unknown names and options are BenchErrors."""
    return resolve_params(DATASETS.get(name), options, ("data_dir", "download"), f"dataset {name!r}")


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training augmentation on x's device in one batched gather: "none" (returns x), or "crop_flip"
    (random crop after 4-pixel zero padding, then horizontal flip with probability 1/2). The
    generator, if given, must be on x's device; the result is determined by its state."""
    if kind not in AUGMENTATIONS:
        raise BenchError(f"unknown augmentation {kind!r}; accepted: {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return x
    n, _, h, w = x.shape
    p = CROP_PADDING
    dy, dx = torch.randint(0, 2 * p + 1, (2, n, 1), generator=generator, device=x.device)
    flip = torch.randint(0, 2, (n, 1), generator=generator, device=x.device).bool()
    rows = dy + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    cols = dx + torch.where(flip, w - 1 - cols, cols)
    padded = F.pad(x, (p, p, p, p))
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def eval_indices(n_test: int, n_samples: int | None, seed: int = 0) -> list[int]:
    """A fixed evaluation subset: the first `n_samples` of a seeded permutation, sorted (so a
    smaller subset is contained in a larger one); None or >= n_test means all samples."""
    if n_samples is None or n_samples >= n_test:
        return list(range(n_test))
    if n_samples < 1:
        raise BenchError(f"the number of evaluation samples must be >= 1 (or omitted for all), got {n_samples}")
    return sorted(np.random.RandomState(seed).permutation(n_test)[:n_samples].tolist())


# ---------------------------------------------------------------- offline datasets


@register_dataset()
def digits(data_dir=None, download=True) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): always available offline.
    mean/std: the train split's pixel statistics, rounded to 4 decimals."""
    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = np.random.RandomState(SPLIT_SEED).permutation(len(x))
    test, val, train = (np.sort(s) for s in np.split(perm, [DIGITS_TEST, DIGITS_TEST + DIGITS_VAL]))
    return Dataset("digits", x[train], y[train], x[val], y[val], x[test], y[test], 10, (0.3054,), (0.3765,),
                   "none", DIGITS_THREAT,
                   f"scikit-learn {sklearn.__version__} load_digits ({len(x)} images); seeded split (seed {SPLIT_SEED}): "
                   f"{len(train)} train / {len(val)} val / {len(test)} test")


@register_dataset()
def synthetic(data_dir=None, download=True, n_train=256, n_val=64, n_test=128, num_classes=4,
              shape=(1, 8, 8), seed=0) -> Dataset:
    """Learnable generated data for tests: one random prototype image per class plus Gaussian
    noise (std 0.25), clamped to [0, 1]."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1 or min(n_train, n_val, n_test) < 1 or num_classes < 2:
        raise BenchError(f"synthetic needs shape (C, H, W) of positive ints, n_train/n_val/n_test >= 1 and "
                         f"num_classes >= 2; got shape={shape}, n_train={n_train}, n_val={n_val}, "
                         f"n_test={n_test}, num_classes={num_classes}")
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand((num_classes, *shape), generator=g)

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        return (prototypes[y] + 0.25 * torch.randn((n, *shape), generator=g)).clamp(0, 1), y

    (trx, try_), (vx, vy), (tx, ty) = sample(n_train), sample(n_val), sample(n_test)
    c = shape[0]
    return Dataset("synthetic", trx, try_, vx, vy, tx, ty, num_classes, (0.5,) * c, (0.5,) * c, "none",
                   SYNTHETIC_THREAT, f"synthetic prototypes + noise (seed {seed}): "
                   f"{n_train} train / {n_val} val / {n_test} test, {num_classes} classes, shape {shape}")


# ---------------------------------------------------------------- MNIST


@register_dataset()
def mnist(data_dir=None, download=True) -> Dataset:
    """MNIST from the standard IDX files; 1,000 seeded training images held out for validation."""
    paths = _find_mnist("mnist", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), data_dir, download)
    x, y = _mnist_pair(paths[0], paths[1])
    test_x, test_y = _mnist_pair(paths[2], paths[3])
    train, val = _holdout(len(x), MNIST_VAL)
    return Dataset("mnist", x[train], y[train], x[val], y[val], test_x, test_y, 10, (0.1307,), (0.3081,),
                   "none", MNIST_THREAT, f"{_describe(paths)}; split: {len(train)} train / {len(val)} val "
                   f"(held out, seed {SPLIT_SEED}) / {len(test_x)} test (t10k)")


@register_dataset()
def mnist_t10k(data_dir=None, download=True) -> Dataset:
    """The real MNIST test set only (for machines holding just the t10k files): images 0-7,999
    train (500 of them, seeded, held out for validation), images 8,000-9,999 test."""
    paths = _find_mnist("mnist_t10k", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), data_dir, download)
    x, y = _mnist_pair(*paths)
    if len(x) <= T10K_TRAIN:
        raise BenchError(f"{paths[0]} holds {len(x)} images; mnist_t10k needs more than {T10K_TRAIN} "
                         "(the MNIST test set has 10,000)")
    train, val = _holdout(T10K_TRAIN, T10K_VAL)
    return Dataset("mnist_t10k", x[train], y[train], x[val], y[val], x[T10K_TRAIN:], y[T10K_TRAIN:], 10,
                   (0.1307,), (0.3081,), "none", MNIST_THREAT,
                   f"{_describe(paths)}; split: images 0-{T10K_TRAIN - 1} as {len(train)} train / {len(val)} val "
                   f"(held out, seed {SPLIT_SEED}), images {T10K_TRAIN}-{len(x) - 1} as test")


def _find_mnist(dataset: str, stems: tuple[str, ...], data_dir, download) -> list[Path]:
    root = _root(data_dir)
    found = _find_or_download(dataset, {s + ".gz": (s + ".gz", s) for s in stems}, [root, root / "mnist"],
                              download, MNIST_URLS)
    return [found[s + ".gz"] for s in stems]


def _mnist_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _read_idx(images_path, ndim=3), _read_idx(labels_path, ndim=1)
    if len(images) != len(labels) or labels.max(initial=0) > 9:
        raise BenchError(f"{images_path} ({len(images)} images) and {labels_path} ({len(labels)} labels, "
                         f"max {labels.max(initial=0)}) do not form an MNIST split; re-download both files")
    return _pixels(images[:, None]), torch.from_numpy(labels.astype(np.int64))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (raw or .gz) with `ndim` dimensions."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise BenchError(f"cannot read {path}: {exc}; delete it and download it again") from None
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != 0x0800 + ndim or len(data) < header:
        raise BenchError(f"{path} is not an IDX file of {ndim}-D unsigned bytes: magic number "
                         f"{'missing' if magic is None else hex(magic)}, expected {hex(0x0800 + ndim)}; "
                         "delete it and download it again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + int(np.prod(dims)):
        raise BenchError(f"{path} has {len(data) - header} data bytes but its header {dims} needs "
                         f"{int(np.prod(dims))}: the file is truncated or corrupt; delete it and download it again")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


# ---------------------------------------------------------------- CIFAR


@register_dataset()
def cifar10(data_dir=None, download=True) -> Dataset:
    """CIFAR-10, python version; 1,000 seeded training images held out for validation (Rice et al. 2020)."""
    return _cifar("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                  [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10,
                  (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), data_dir, download)


@register_dataset()
def cifar100(data_dir=None, download=True) -> Dataset:
    """CIFAR-100 with its 100 fine labels; 1,000 seeded training images held out for validation."""
    return _cifar("cifar100", "cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", b"fine_labels", 100,
                  (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), data_dir, download)


def _cifar(name, archive, folder, train_files, test_file, label_key, num_classes, mean, std, data_dir, download):
    path = _find_or_download(name, {archive: (archive, folder)}, [_root(data_dir)], download, CIFAR_URLS)[archive]
    batches = _read_cifar_batches(path, folder, [*train_files, test_file])
    xs, ys = [], []  # uint8 until split, to keep peak memory low
    for file, batch in zip([*train_files, test_file], batches):
        try:
            x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(batch[label_key], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise BenchError(f"{path}: batch {file!r} is not a CIFAR batch ({exc}); "
                             "delete it and download it again") from None
        if len(x) != len(y):
            raise BenchError(f"{path}: batch {file!r} has {len(x)} images but {len(y)} labels; "
                             "delete it and download it again")
        xs.append(x)
        ys.append(torch.from_numpy(y))
    x, y = np.concatenate(xs[:-1]), torch.cat(ys[:-1])
    train, val = _holdout(len(x), CIFAR_VAL)
    return Dataset(name, _pixels(x[train]), y[train], _pixels(x[val]), y[val], _pixels(xs[-1]), ys[-1], num_classes,
                   mean, std, "crop_flip", CIFAR_THREAT, f"{_describe([path])}; split: {len(train)} train / {len(val)} val "
                   f"(held out, seed {SPLIT_SEED}) / {len(xs[-1])} test")


def _read_cifar_batches(path: Path, folder: str, files: list[str]) -> list[dict]:
    """Unpickle the batches from the (MD5-checked) tarball, read in memory, or its extracted folder."""
    try:
        if path.is_dir():
            return [_unpickle_arrays((path / f).read_bytes()) for f in files]
        with tarfile.open(path, "r:gz") as tar:
            return [_unpickle_arrays(tar.extractfile(f"{folder}/{f}").read()) for f in files]
    except (OSError, EOFError, KeyError, AttributeError, tarfile.TarError, pickle.UnpicklingError) as exc:
        raise BenchError(f"cannot read the CIFAR batches from {path}: {type(exc).__name__}: {exc}; "
                         "delete it and download it again") from None


class _ArrayUnpickler(pickle.Unpickler):
    """Loads plain data and NumPy arrays only: the CIFAR batches are data-only dicts, and nothing
    else (no code) may come out of a pickle. `_codecs.encode` is how protocol 2 stores bytes."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only NumPy arrays are allowed)")
        return super().find_class(module, name)


def _unpickle_arrays(data: bytes) -> dict:
    return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()


# ---------------------------------------------------------------- files, checksums, downloads


def _root(data_dir) -> Path:
    return Path(data_dir or os.environ.get("BENCH_DATA_DIR") or "data").expanduser().resolve()


def _holdout(n: int, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices of range(n), with n_val seeded validation indices."""
    if not 0 < n_val < n:
        raise BenchError(f"cannot hold out {n_val} validation samples from {n} training samples")
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _pixels(a: np.ndarray) -> torch.Tensor:
    """uint8 array -> float32 tensor in [0, 1]."""
    return torch.from_numpy(a.astype(np.float32)).div_(255)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe(paths: list[Path]) -> str:
    return ", ".join(f"{p} ({'md5 ' + MD5[p.name] + ' verified' if p.name in MD5 else 'unpacked copy, no checksum'})"
                     for p in paths)


def _find_or_download(dataset: str, wanted: dict[str, tuple[str, ...]], dirs: list[Path], download: bool,
                      base_urls: tuple[str, ...]) -> dict[str, Path]:
    """Path of each wanted file: the first of its accepted names present in `dirs`, else downloaded
    into dirs[0] when allowed. `wanted` maps each official file name to its accepted names (official
    first, then unpacked copies); official files found or fetched are MD5-checked."""
    found: dict[str, Path] = {}
    for official, names in wanted.items():
        path = next((d / n for n in names for d in dirs if (d / n).exists()), None)
        if path is not None and path.name in MD5 and (actual := _md5(path)) != MD5[path.name]:
            raise BenchError(f"{path} has md5 {actual} but the official {path.name} has md5 {MD5[path.name]}: "
                             "the file is corrupt or incomplete; delete it and download it again")
        if path is not None:
            found[official] = path
    missing = [f for f in wanted if f not in found]
    failure = "downloading is off (download=False)"
    if download:
        for official in missing:
            try:
                found[official] = _download(official, base_urls, dirs[0])
            except OSError as exc:
                failure = f"the download failed ({exc})"
                break
    missing = [f for f in wanted if f not in found]
    if missing:
        looked_for = ", ".join(" or ".join(wanted[f]) for f in missing)
        raise BenchError(f"dataset {dataset!r}: {looked_for} not found in {' or '.join(map(str, dirs))}, and "
                         f"{failure}. To fix: download {', '.join(base_urls[0] + f for f in missing)} on a machine "
                         f"with internet and pass --data-dir FOLDER (the folder holding {', '.join(missing)})")
    return found


def _download(name: str, base_urls: tuple[str, ...], folder: Path) -> Path:
    """Fetch `name` from the first mirror that serves it with the official MD5, into a temporary
    file that is renamed to `folder/name` only when complete; OSError lists each mirror's error."""
    errors = []
    for base in base_urls:
        tmp = None
        try:
            with urllib.request.urlopen(base + name, timeout=DOWNLOAD_TIMEOUT) as response:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=folder, prefix=name + ".", suffix=".part", delete=False) as out:
                    tmp = Path(out.name)
                    shutil.copyfileobj(response, out)
            if (actual := _md5(tmp)) != MD5[name]:
                raise OSError(f"md5 {actual}, expected {MD5[name]}")
            os.replace(tmp, folder / name)
            return folder / name
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{base}{name}: {type(exc).__name__}: {exc}")
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()
    raise OSError("; ".join(errors))
