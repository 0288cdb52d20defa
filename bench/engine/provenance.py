"""Where a result came from: git commit, package versions, device, UTC time."""

from __future__ import annotations

import functools
import hashlib
import inspect
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

PACKAGES = ("atbench", "torch", "numpy", "scikit-learn", "SQLAlchemy", "torchattacks", "torchvision")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout this code runs from, with '-dirty' when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with what decides its float results: the intra-op thread count
    and the vector instruction set PyTorch dispatches to (AVX2 and AVX-512 kernels round differently)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()})")


def source_digest(*paths: str | Path) -> str:
    """A hash of the given source files (the code behind a result, to notice an edit that kept its revision)."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def training_sources(defense_cls) -> dict[str, str]:
    """Digests of the code a run's weights depend on: its defense's module, the adversary library,
    the training loop."""
    engine = Path(__file__).parent
    return {"defense": source_digest(inspect.getsourcefile(defense_cls)),
            "adversary": source_digest(*(engine.parent / "adversary").glob("*.py")),
            "trainer": source_digest(engine / "trainer.py", engine / "runspec.py")}


def provenance(device: torch.device, config: dict, seed: int) -> dict:
    """Keyword arguments for a store row's provenance columns."""
    return {"git_commit": git_commit(), "versions": versions(), "device": device_name(device),
            "config": config, "seed": seed}
