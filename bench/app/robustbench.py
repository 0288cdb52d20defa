"""RobustBench (Croce et al., NeurIPS 2021 Datasets and Benchmarks; github RobustBench/robustbench):
its model zoo in, its leaderboard format out.

In: `zoo_model` builds a zoo entry's architecture with the `robustbench` package (the optional
extra `atbench[robustbench]`, imported only here and only when asked; it needs torchvision) and
loads its weights from `MODEL_DIR/DATASET/NORM/NAME.pt`, RobustBench's own layout, downloading
them there when missing (from Google Drive, as RobustBench does). The weights are read by
`bench.engine.external.load_weights` (weights_only, the "state_dict" wrapper and "module."
prefix of the zoo's files handled). Ensembles and timm-hosted entries are left to RobustBench:
load those with `robustbench.utils.load_model` and pass the model to `atbench.evaluate`.

Out: `export_model_info` writes one `model_info` JSON per leaderboard row, in the layout and with
the fields of RobustBench's `model_info/DATASET/NORM/NAME.json` files (the `ModelInfo` dataclass of
robustbench/utils.py plus `unreliable` and `external` as its leaderboard files use them):
accuracies as percent strings with two decimals, eps as written there ("8/255", "0.5"),
`autoattack_acc` from an AutoAttack evaluation at the standard version's own budget when the row
has one (either implementation; the footnote says which ran), `external` the
per-sample worst case over all of the row's attacks (what RobustBench ranks by first; the footnote
adds the adaptive worst case where the remedies of failed checks ran), and `unreliable` set when a
sanity check failed. What atbench does not know (link, authors, venue,
reported) is null, as RobustBench's own `update_json` writes it for a new model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import pandas as pd

from bench.app.report import leaderboard
from bench.core.config import suggest
from bench.core.errors import BenchError
from bench.core.threat import format_eps
from bench.engine.external import load_weights
from bench.store import Store

INSTALL = "pip install 'atbench[robustbench]'"
STANDARD = {"version": "standard", "apgd_steps": 100, "fab_steps": 100, "n_target_classes": 9, "square_queries": 5000}
FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
          "eps", "clean_acc", "reported", "autoattack_acc", "external", "footnote", "unreliable")


def weights_path(model_dir: str | Path, dataset: str, norm: str, name: str) -> Path:
    """Where RobustBench keeps (and looks for) a zoo entry's weights."""
    return Path(model_dir) / dataset / norm / f"{name}.pt"


def package():
    """RobustBench's zoo, its enums and its download function; a BenchError saying what to install
    when the package (or torchvision, which it imports) is missing."""
    try:
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import download_gdrive_new
    except ImportError as exc:
        raise BenchError(f"--robustbench needs the robustbench package: {INSTALL} (import failed: {exc})") from None
    return model_dicts, BenchmarkDataset, ThreatModel, download_gdrive_new


def zoo_model(name: str, dataset: str, norm: str, model_dir: str | Path):
    """(model in eval mode, weights path) of the RobustBench zoo entry `name` for `dataset` at `norm`."""
    model_dicts, BenchmarkDataset, ThreatModel, download_gdrive_new = package()
    try:
        zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(norm)]
    except (ValueError, KeyError):
        raise BenchError(f"RobustBench has no {dataset} {norm} leaderboard; its datasets: "
                         f"{', '.join(d.value for d in model_dicts)}") from None
    if name not in zoo:
        raise BenchError(f"RobustBench has no model {name!r} for {dataset} {norm}.{suggest(name, zoo)}")
    entry = zoo[name]
    if not isinstance(entry.get("gdrive_id"), str):
        raise BenchError(f"RobustBench model {name!r} is an ensemble or hosted by timm: load it with "
                         f"robustbench.utils.load_model and evaluate it with atbench.evaluate(model, ...)")
    path = weights_path(model_dir, dataset, norm, name)
    if not path.is_file():
        fetch(path, lambda: download_gdrive_new(entry["gdrive_id"], path))
    return load_weights(entry["model"](), path).eval(), path


def fetch(path: Path, download: Callable[[], None]) -> None:
    """Run `download` to create `path`; any failure (offline, quota) is a one-line BenchError saying
    where to put the file by hand. A partial file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        download()
    except Exception as exc:  # requests, gdown and OS errors alike: none of them leaves a usable file
        path.unlink(missing_ok=True)
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise BenchError(f"cannot download the weights to {str(path)!r} ({type(exc).__name__}: {first}); offline, "
                         f"copy the file there (RobustBench's models/DATASET/NORM/NAME.pt) and run again") from None
    if not path.is_file():
        raise BenchError(f"the download left no file at {str(path)!r}; copy the weights there and run again")


def export_model_info(store: Store, out_dir: str | Path) -> list[Path]:
    """Write `out_dir/DATASET/NORM/NAME.json` for every leaderboard row; returns the paths."""
    written: list[Path] = []
    for row in leaderboard(store):
        folder = Path(out_dir) / row["dataset"] / row["norm"]
        stem = _slug(row["name"] if row["kind"] == "external" else f"{row['name']}_{row['kind']}")
        path = folder / f"{stem}.json"
        if path in written:
            path = folder / f"{stem}_{row['sha256'][:8]}.json"
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(model_info(row), indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


def model_info(row: dict) -> dict:
    """A RobustBench model_info dict for one leaderboard row (see the module docstring)."""
    evaluations = row["evaluations"]
    aa = [e for e in evaluations if e["attack"] == "autoattack" and standard_budget(e["params"] or {})]
    aa = max(aa, key=lambda e: (e["n_samples"], e["evaluation_id"])) if aa else None
    footnote = (f"Measured by atbench on {row['n']} test samples: worst case = per-sample AND over clean and "
                f"{len(evaluations)} attacks ({', '.join(e['label'] for e in evaluations)})")
    if aa is not None:
        footnote += f"; AutoAttack: {aa['implementation']}, {aa['n_samples']} samples"
    if row["failed"]:
        footnote += f"; failed sanity checks: {', '.join(row['failed'])}"
    if pd.notna(row.get("adaptive")):
        footnote += f"; adaptive worst case (with the remedies of the flagged checks) {_percent(row['adaptive'])}%"
    info = {
        "link": None, "name": row["name"], "authors": None,
        "additional_data": False if row["kind"] != "external" else None,
        "number_forward_passes": 1, "dataset": row["dataset"], "venue": None,
        "architecture": row["model"] if isinstance(row["model"], str) else None,
        "eps": format_eps(row["eps"]), "clean_acc": _percent(row["clean"]), "reported": None,
        "autoattack_acc": _percent(aa["robust_acc"]) if aa is not None else None,
        "external": _percent(row["worst"]), "footnote": footnote + ".", "unreliable": bool(row["failed"]),
    }
    assert tuple(info) == FIELDS
    return info


def standard_budget(params: dict) -> bool:
    """AutoAttack's standard version at its own budget (100 APGD and FAB steps, 9 targets, 5,000
    Square queries): what RobustBench's `autoattack_acc` reports. A reduced budget is only an attack
    among the others (in `external`)."""
    return all(params.get(key) == value for key, value in STANDARD.items())


def _percent(x) -> str | None:
    """RobustBench's accuracy text: percent, rounded to two decimals (`str(round(acc * 100, 2))`)."""
    return None if x is None or pd.isna(x) else str(round(float(x) * 100, 2))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "model"
