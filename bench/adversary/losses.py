"""Per-sample losses that attacks maximize and defenses minimize."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample C&W margin max_{j≠y} z_j − z_y (positive once misclassified; Carlini & Wagner 2017)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def kl_per_sample(p_log_target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) per sample, with log p given (TRADES' robust term)."""
    return (p_log_target.exp() * (p_log_target - F.log_softmax(logits, dim=1))).sum(1)


def other_classes(logits: torch.Tensor, y: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Per sample, the classes j ≠ y by decreasing logit (the first `k` of them; default all C − 1),
    shape (N, k): the targets or candidates of attacks that rank the wrong classes."""
    masked = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return masked.topk(logits.shape[1] - 1 if k is None else k, dim=1).indices


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": ce_loss, "cw": margin_loss}
