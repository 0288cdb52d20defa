"""Forward/backward pass counting, in per-sample units (a batch of B counts B)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn as nn


@dataclass
class PassCounter:
    forward: int = 0
    backward: int = 0

    def _on_forward(self, module, inputs, output):
        n = output.shape[0]
        self.forward += n
        if output.requires_grad:
            # fires once for every backward pass that goes through this forward
            output.register_hook(lambda grad: self._on_backward(n))

    def _on_backward(self, n: int):
        self.backward += n


@contextmanager
def count_passes(model: nn.Module, counter: PassCounter | None = None):
    """Count the model's forward and backward passes inside the block."""
    counter = counter if counter is not None else PassCounter()
    handle = model.register_forward_hook(counter._on_forward)
    try:
        yield counter
    finally:
        handle.remove()
