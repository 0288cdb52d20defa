"""Inline SVG charts for the report, as coordinates the templates draw (no scripts, no external
resources): line charts (training and evaluation curves) and the cost–robustness scatter plot with
its Pareto front."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def line_chart(title: str, x_label: str, y_label: str, series: list[tuple[str, list, list]], *, percent: bool = False,
               log_x: bool = False, marker: float | None = None, w: int = 480, h: int = 220) -> dict:
    """Coordinates for an inline SVG line chart (no scripts, no external resources). `series` are
    (name, xs, ys); `percent` draws 0–100% of fractions; `log_x` a log scale (x > 0 only);
    `marker` a dashed vertical line at that x."""
    left, right, top, bottom = 52, 12, 12, 34
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    clean = [(n, [(tx(x), y) for x, y in zip(xs, ys) if pd.notna(y) and (x > 0 or not log_x)]) for n, xs, ys in series]
    clean = [(n, pts) for n, pts in clean if pts]
    xs = [x for _, pts in clean for x, _ in pts] or [0.0]
    ys = [y for _, pts in clean for _, y in pts] or [0.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (0.0, 1.0) if percent else (min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0)
    px = lambda v: left + (v - x0) / ((x1 - x0) or 1) * (w - left - right)   # noqa: E731
    py = lambda v: top + (1 - (v - y0) / ((y1 - y0) or 1)) * (h - top - bottom)  # noqa: E731
    if log_x:
        xticks = [(px(k), f"{10 ** k:g}") for k in range(math.floor(x0), math.ceil(x1) + 1) if x0 <= k <= x1]
    else:
        xticks = [(px(v), f"{v:.3g}") for v in np.linspace(x0, x1, 5)]
    yticks = [(py(y0 + f * (y1 - y0)), f"{100 * (y0 + f * (y1 - y0)):.0f}" if percent else f"{y0 + f * (y1 - y0):.3g}")
              for f in (0, 0.25, 0.5, 0.75, 1)]
    return {"title": title, "x_label": x_label, "y_label": y_label, "w": w, "h": h, "left": left, "right": w - right,
            "top": top, "bottom": h - bottom,
            "series": [{"name": n, "index": i, "points": " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)}
                       for i, (n, pts) in enumerate(clean)],
            "xticks": [(f"{x:.1f}", t) for x, t in xticks], "yticks": [(f"{y:.1f}", t) for y, t in yticks],
            "marker": None if marker is None or not x0 <= tx(marker) <= x1 else f"{px(tx(marker)):.1f}"}


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1, 2, 5 × powers of ten between lo and hi (log10 values), or the decades when there are many."""
    decades = range(math.floor(lo), math.ceil(hi) + 1)
    ticks = [math.log10(m * 10 ** k) for k in decades for m in (1, 2, 5)]
    inside = [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
    return inside if len(inside) <= 8 else [float(k) for k in decades if lo - 1e-9 <= k <= hi + 1e-9]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none is at most as costly (x) and strictly more
    robust (y), or cheaper and as robust. In increasing cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def cost_plot(title: str, points: list[dict], *, w: int = 640, h: int = 340) -> dict | None:
    """Worst-case accuracy against training passes per sample (log x), each point linked to its
    run page. `points`: dicts with name, href, cost (forward + backward passes per sample), worst
    and, when measured, adaptive (fractions). The Pareto front is drawn for the worst case, and for
    the adaptive worst case when any point has one. None when no point has a cost."""
    points = [p for p in points if p["cost"] and p["cost"] > 0 and pd.notna(p["worst"])]
    if not points:
        return None
    left, right, top, bottom = 52, 150, 14, 40
    xs = [math.log10(p["cost"]) for p in points]
    x0, x1 = min(xs), max(xs)
    if x1 - x0 < 1:                        # at least a decade, centred on the points
        x0, x1 = (x0 + x1) / 2 - 0.5, (x0 + x1) / 2 + 0.5
    px = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)   # noqa: E731
    py = lambda v: top + (1 - v) * (h - top - bottom)                 # noqa: E731
    adaptive = any(pd.notna(p.get("adaptive")) for p in points)

    def front(key: str) -> str:
        pts = [(math.log10(p["cost"]), p[key]) for p in points if pd.notna(p.get(key))]
        if not pts:
            return ""
        corners, previous = [], None
        for i in pareto_front(pts):
            x, y = pts[i]
            if previous is not None:
                corners.append((x, previous))   # a staircase: cost first, then robustness
            corners.append((x, y))
            previous = y
        corners.append((x1, previous))          # more cost buys at least as much robustness
        return " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in corners)

    dots = []
    for p, x in zip(points, xs):
        dot = {"name": p["name"], "href": p["href"], "x": f"{px(x):.1f}", "y": f"{py(p['worst']):.1f}",
               "label": f"{p['name']}: worst case {100 * p['worst']:.1f}%, {p['cost']:.4g} passes per sample"}
        if pd.notna(p.get("adaptive")):
            dot["ay"] = f"{py(p['adaptive']):.1f}"
            dot["label"] += f", adaptive worst case {100 * p['adaptive']:.1f}%"
        dots.append(dot)
    return {"title": title, "w": w, "h": h, "left": left, "right": w - right, "top": top, "bottom": h - bottom,
            "xticks": [(f"{px(t):.1f}", f"{10 ** t:.3g}") for t in _log_ticks(x0, x1)],
            "yticks": [(f"{py(f):.1f}", f"{100 * f:.0f}") for f in (0, 0.25, 0.5, 0.75, 1)],
            "front": front("worst"), "adaptive_front": front("adaptive") if adaptive else None,
            "adaptive": adaptive, "points": dots}
