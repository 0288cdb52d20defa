"""Random-number streams: a block that draws from the global RNG without disturbing the caller's
stream, and the seeds derived from (seed, position) that make results independent of what ran
before them."""

from __future__ import annotations

import torch


def fork_rng(device: torch.device):
    """`torch.random.fork_rng` over the CPU and, on CUDA, that device: the block may reseed and
    draw; the caller's RNG state is restored after it."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def batch_seed(seed: int, start: int) -> int:
    """The RNG seed of the batch that begins at position `start` of a sample set."""
    return (seed * 1_000_003 + start) % (2 ** 63)


def epoch_seed(seed: int, epoch: int) -> int:
    """The RNG seed of a training epoch (data order, augmentation, the defense's draws)."""
    return (seed * 1_000_003 + epoch * 7919) % (2 ** 63)
