"""Is a model random in eval mode? The measurement behind the `deterministic_outputs` check and
the evaluator's verdicts on randomized models (`bench.engine.evaluation`).

8 forward passes of the same inputs, pass j cut into 1, 2, 4 or 8 batches (30 forward calls),
compared sample by sample with the first. A logit that moves by more than 1e-3 of the largest
logit is randomness; a move below that between different batchings is not (kernels chosen per
batch size round differently); identical computations should agree to 1e-5. How likely a miss
is: randomness drawn per sample shows on every call; randomness drawn once per forward call
passes only if all 30 calls make the same draw (probability ≤ p^29, p the most likely draw's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PASSES = 8                  # forward passes over the samples ...
SPLITS = (1, 2, 4, 8)       # ... pass j cut into SPLITS[j mod 4] batches: 30 forward calls in all
CHANGED, EXACT = 1e-3, 1e-5  # relative change of the logits that is randomness; that identical passes may not reach


@dataclass
class OutputChanges:
    """What the passes showed: per sample, whether its outputs changed (`samples`) and whether its
    prediction flipped; per forward call whether it changed; the largest relative change overall
    and between passes batched alike."""

    samples: torch.Tensor
    flipped: torch.Tensor
    calls: list[bool]
    relative: float
    exact: float

    @property
    def random(self) -> bool:
        return bool(self.samples.any())


def output_changes(model, x: torch.Tensor) -> OutputChanges:
    """Run the passes (see the module docstring) on `x` and measure what changed."""
    n = len(x)
    with torch.no_grad():
        passes = [(k, [model(b) for b in x.tensor_split(k)])
                  for k in (min(SPLITS[j % len(SPLITS)], n) for j in range(PASSES))]
    first = torch.cat(passes[0][1])
    scale = first.abs().amax().clamp_min(1e-12)
    moved = torch.stack([(torch.cat(out) - first).abs().amax(1) / scale for _, out in passes])  # (passes, n)
    exact = max((moved[j].max().item() for j, (k, _) in enumerate(passes) if k == passes[0][0]), default=0.0)
    flipped = torch.stack([torch.cat(out).argmax(1) != first.argmax(1) for _, out in passes]).any(0)
    samples = (moved > CHANGED).any(0) | (flipped & (moved > EXACT).any(0))
    calls = [bool((moved[j][idx] > CHANGED).any()) for j, (k, _) in enumerate(passes)
             for idx in torch.arange(n, device=moved.device).tensor_split(k)]
    return OutputChanges(samples, flipped, calls, moved.max().item(), exact)
