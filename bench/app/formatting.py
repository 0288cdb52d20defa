"""How the report writes numbers, times, threat models, sample lists and file names."""

from __future__ import annotations

import re
from typing import Sequence

import pandas as pd

from bench.core.threat import format_eps

DASH = "—"


def pct(x) -> str:
    return DASH if pd.isna(x) else f"{100 * x:.1f}"


def signed_pct(x) -> str:
    """A difference of fractions in percentage points, with its sign."""
    return DASH if pd.isna(x) else f"{100 * x:+.1f}".replace("-", "−")


def integer(x) -> str:
    return DASH if pd.isna(x) else str(int(x))


def num(x) -> str:
    return DASH if pd.isna(x) else f"{x:.4g}"


def time(t) -> str:
    return DASH if pd.isna(t) else f"{t:%Y-%m-%d %H:%M:%S} UTC"


def threat(norm, eps) -> str:
    return DASH if pd.isna(norm) else f"{norm} ε = {format_eps(eps)}"


def split_threat(key: str) -> tuple[str, float]:
    """(norm, eps) of a `ThreatModel.key`."""
    norm, _, eps = key.partition(":")
    return norm, float(eps)


def duration(s) -> str:
    if pd.isna(s) or s <= 0:
        return DASH
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def passes(fwd, bwd) -> str:
    return DASH if pd.isna(fwd) and pd.isna(bwd) else f"{num(fwd)} / {num(bwd)}"


def sample_list(indices: Sequence[int], limit: int = 40) -> str:
    """Sorted sample indices with runs of three or more written as ranges ("3–7, 12, 15–18"), at
    most `limit` items, then how many samples more."""
    values = sorted({int(i) for i in indices})
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    items: list[str] = []
    for r in runs:
        items += [f"{r[0]}–{r[-1]}"] if len(r) >= 3 else [str(v) for v in r]
    shown = items[:limit]
    counted = sum(int(i.split("–")[1]) - int(i.split("–")[0]) + 1 if "–" in i else 1 for i in shown)
    text = ", ".join(shown)
    return (text + f", … ({len(values) - counted} more)" if len(items) > limit else text) or DASH


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def run_href(run_id: str) -> str:
    return f"runs/{slug(run_id)}.html"
