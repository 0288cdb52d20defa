"""What papers claim, to show next to what we measured: the seed papers' headline numbers
(`bench/app/data/seed_claims.toml`, copied from their texts with table and page) and RobustBench
model-info JSONs (`model_info/<dataset>/<Linf|L2>/<model id>.json`) found in a claims folder.

A claim matches a leaderboard row when the dataset and threat model are the same and either the
run trained that defense (with the claim's defense parameters) on that architecture, or (for a
RobustBench claim) the checkpoint file or run label is named after the model id.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from bench.core.errors import BenchError
from bench.core.threat import parse_eps

SEED_CLAIMS = "seed papers"
METRICS = ("clean", "pgd20", "autoattack")  # the columns a claim may give, in %


@dataclass(frozen=True)
class Claim:
    """A paper's numbers for one setting (accuracies in %, None when not reported)."""

    paper: str
    method: str
    dataset: str
    architecture: str
    norm: str
    eps: float
    clean: float | None = None
    pgd20: float | None = None
    autoattack: float | None = None
    table: str | None = None
    page: int | None = None
    source: str = ""
    note: str = ""
    defense: str | None = None
    model: dict | None = None            # atbench model name and parameters of the same architecture
    params: dict = field(default_factory=dict)  # defense parameters the claim's method fixes
    model_id: str | None = None          # RobustBench model id
    origin: str = SEED_CLAIMS

    def matches(self, dataset: str, norm: str, eps: float, config: dict | None, names: tuple[str, ...]) -> bool:
        """Same setting as a row: its `dataset`, threat model, the run's `config` (None for a
        checkpoint trained elsewhere) and the `names` it is known by (file stem, label)."""
        if dataset != self.dataset or norm != self.norm or not math.isclose(eps, self.eps, rel_tol=1e-6):
            return False
        if self.model_id is not None:
            return self.model_id in names
        if config is None or self.model is None or config.get("defense") != self.defense:
            return False
        model = {"name": config.get("model"), **(config.get("model_params") or {})}
        defense_params = config.get("defense_params") or {}
        return (all(model.get(k) == v for k, v in self.model.items())
                and all(defense_params.get(k) == v for k, v in self.params.items()))


def seed_claims() -> list[Claim]:
    text = resources.files("bench.app").joinpath("data/seed_claims.toml").read_text(encoding="utf-8")
    return [_claim(entry, SEED_CLAIMS) for entry in tomllib.loads(text)["claim"]]


def load_claims(folder: str | Path | None) -> list[Claim]:
    """The seed papers' claims, then every RobustBench JSON under `folder` (when given)."""
    claims = seed_claims()
    if folder is not None:
        claims += [robustbench_claim(path) for path in sorted(Path(folder).rglob("*.json"))]
    return claims


def robustbench_claim(path: str | Path) -> Claim:
    """A RobustBench model-info JSON as a claim; its threat model is the folder it lies in (Linf,
    L2), as in RobustBench's `model_info/<dataset>/<threat model>/`."""
    path = Path(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        norm = {"linf": "Linf", "l2": "L2"}.get(path.parent.name.lower())
        if norm is None:
            raise BenchError(f"cannot tell the threat model of {str(path)!r}: RobustBench keeps model infos in a "
                             f"folder named Linf or L2")
        return Claim(paper=str(info.get("name") or path.stem), method=path.stem, dataset=str(info["dataset"]),
                     architecture=str(info.get("architecture") or ""), norm=norm,
                     eps=parse_eps(info["eps"], f"{path}: eps"), clean=_percent(info.get("clean_acc")),
                     autoattack=_percent(info.get("autoattack_acc")), source=str(info.get("link") or ""),
                     note=_robustbench_note(info), model_id=path.stem, origin=f"RobustBench {path.name}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"cannot read the RobustBench model info {str(path)!r}: {exc}") from None


def _robustbench_note(info: dict) -> str:
    notes = [str(info.get("venue") or "")]
    if info.get("reported") not in (None, ""):
        notes.append(f"paper reports {info['reported']}")
    if info.get("additional_data"):
        notes.append("extra training data")
    if info.get("footnote"):
        notes.append(str(info["footnote"]))
    return "; ".join(n for n in notes if n)


def _claim(entry: dict, origin: str) -> Claim:
    known = set(Claim.__dataclass_fields__) - {"eps", "origin", "model_id"}
    unknown = set(entry) - known - {"eps"}
    if unknown:
        raise BenchError(f"claim {entry.get('method')!r}: unknown keys {sorted(unknown)}")
    values = {k: v for k, v in entry.items() if k in known}
    return Claim(**values, eps=parse_eps(entry["eps"]), origin=origin)


def _percent(value) -> float | None:
    return None if value in (None, "") else float(value)
