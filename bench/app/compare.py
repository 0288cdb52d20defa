"""Two checkpoints compared sample by sample on one leaderboard (dataset, threat model): per attack
and for the worst case, the accuracies on the samples both were evaluated on, their paired
difference with Newcombe's 95% interval and McNemar's exact test; the samples one keeps and the
other loses; and the stored adversarial examples of a few of those."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.app import formatting as fmt
from bench.app.images import triplet
from bench.core.stats import mcnemar_exact, paired_difference
from bench.store import Store

IMAGES_PER_SIDE = 6  # adversarial examples shown for each direction


def paired_row(name: str, a: np.ndarray, b: np.ndarray, strong: bool = False) -> dict:
    """Accuracies of two paired boolean columns, A − B with its interval, the discordant counts and
    McNemar's exact p-value, formatted."""
    diff, lower, upper = paired_difference(a, b)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = mcnemar_exact(only_a, only_b)
    return {"name": name, "strong": strong, "n": len(a), "a": fmt.pct(a.mean() if len(a) else np.nan),
            "b": fmt.pct(b.mean() if len(b) else np.nan), "diff": fmt.signed_pct(diff),
            "ci": f"[{fmt.signed_pct(lower)}, {fmt.signed_pct(upper)}]" if len(a) else fmt.DASH,
            "only_a": only_a, "only_b": only_b, "p": f"{p:.3g}", "significant": p < 0.05}


def compare(store: Store, a: pd.DataFrame, b: pd.DataFrame, adaptive_a: pd.DataFrame, adaptive_b: pd.DataFrame,
            eps: float, norm: str) -> dict:
    """The comparison of checkpoint A with B. `a`, `b`: their leaderboard evaluations at the threat
    model, clean included (columns evaluation_id, label, attack); `adaptive_*`: their adaptive
    ones (may be empty)."""
    rows = []
    for label in [x for x in a["label"] if x in set(b["label"])]:
        ea, eb = a.loc[a["label"] == label, "evaluation_id"].iloc[0], b.loc[b["label"] == label, "evaluation_id"].iloc[0]
        m = store.sample_matrix([int(ea), int(eb)])
        rows.append(paired_row(label, m.correct[:, 0], m.correct[:, 1]))
    ids_a, ids_b = [int(i) for i in a["evaluation_id"]], [int(i) for i in b["evaluation_id"]]
    m = store.sample_matrix(ids_a + ids_b)
    worst_a, worst_b = m.correct[:, :len(ids_a)].all(1), m.correct[:, len(ids_a):].all(1)
    rows.append(paired_row("worst case (per-sample AND)", worst_a, worst_b, strong=True))
    if len(adaptive_a) or len(adaptive_b):
        ext_a, ext_b = ids_a + [int(i) for i in adaptive_a["evaluation_id"]], ids_b + [int(i) for i in adaptive_b["evaluation_id"]]
        ma = store.sample_matrix(ext_a + ext_b)
        rows.append(paired_row("adaptive worst case", ma.correct[:, :len(ext_a)].all(1),
                               ma.correct[:, len(ext_a):].all(1), strong=True))
    kept_by_a = m.index[worst_a & ~worst_b].tolist()
    kept_by_b = m.index[worst_b & ~worst_a].tolist()
    attacks_b = pd.concat([b, adaptive_b])
    attacks_a = pd.concat([a, adaptive_a])
    return {"n": len(m.index), "rows": rows,
            "same_attacks": set(a["label"]) == set(b["label"]),
            "kept_by_a": {"count": len(kept_by_a), "list": fmt.sample_list(kept_by_a),
                          "images": _images(store, attacks_b, kept_by_a, eps, norm)},
            "kept_by_b": {"count": len(kept_by_b), "list": fmt.sample_list(kept_by_b),
                          "images": _images(store, attacks_a, kept_by_b, eps, norm)}}


def _images(store: Store, loser: pd.DataFrame, samples: list[int], eps: float, norm: str) -> list[dict]:
    """The losing checkpoint's stored adversarial examples of the first samples that have one (one
    per sample: the first of its attacks, in evaluation order, that kept it)."""
    labels = dict(zip(loser["evaluation_id"].astype(int), loser["label"]))
    found: dict[int, dict] = {}
    for example in store.adversarial_examples(list(labels), samples):
        if example.sample_index in found or len(found) >= IMAGES_PER_SIDE:
            continue
        images = triplet(example.clean, example.adversarial, (example.channels, example.height, example.width),
                         eps, norm)
        found[example.sample_index] = {"sample": example.sample_index, "attack": labels[example.evaluation_id],
                                       "label": example.label, "predicted": example.predicted,
                                       "max_change": f"{images.pop('max_change'):.3g}", **images}
    return [found[i] for i in sorted(found)]
