"""Static HTML report: one leaderboard per (dataset, threat model), one page per run, comparison
pages of two checkpoints, and the claims page.

Reads the store with pandas (`Store.tables()`, `Store.sample_matrix`), sorts and formats there,
and renders the Jinja templates in `bench/app/templates` (autoescape on) into `out_dir`:
`index.html`, `runs/<run_id>.html`, `compare/<board>--<a>-vs-<b>.html`, `claims.html`,
`style.css`. Static files with relative links only and no external resources, so the report
opens from disk; the leaderboard's sorting and filtering is a small inline script, and the
tables read fine without it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from bench.app import formatting as fmt
from bench.app.claims import Claim, load_claims
from bench.app.compare import compare
from bench.app.plots import cost_plot, line_chart
from bench.core.attack import ATTACKS
from bench.core.check import CHECKS
from bench.core.errors import BenchError
from bench.core.threat import format_eps
from bench.engine.adaptive import describe
from bench.store import Store

DASH = fmt.DASH
STATUS_ORDER = {"fail": 0, "warn": 1, "pass": 2, "not-run": 3}
STATUS_MEANING = {
    "fail": "Failed: this expectation of a truly robust model does not hold, so the robust accuracy is likely "
            "overstated.",
    "warn": "Warning: a small but significant departure from what a truly robust model shows.",
    "pass": "Passed: no evidence against the measured robustness here.",
    "not-run": "Not run: the results it needs were not computed.",
}
TM = ["dataset", "threat"]                       # one leaderboard
ROW = TM + ["checkpoint_id"]                      # one leaderboard row
VIEWS = ("best", "last")                          # the checkpoint kinds a leaderboard can show alone


@dataclass
class Loaded:
    """What every page reads: the store's tables (`data`), one entry per checkpoint, the worst
    cases, the sanity flags and the claims."""

    store: Store
    data: dict
    entries: pd.DataFrame
    worst: pd.DataFrame
    flags: dict
    claims: list[Claim]


def render_report(store: Store, out_dir: str | Path = "reports", claims_dir: str | Path | None = None) -> Path:
    """Write the report into `out_dir` and return the path of its `index.html`. `claims_dir`: a
    folder of RobustBench model-info JSONs to show as claims besides the seed papers'."""
    out = _folder(out_dir, "runs", "compare")
    for sub in ("runs", "compare"):
        for stale in (out / sub).glob("*.html"):
            stale.unlink()
    loaded = load(store, claims_dir)
    env = _environment()
    boards = [_board(key, grp, loaded) for key, grp in loaded.data["attacks"].groupby(TM, sort=True)]
    runs = _format_runs(loaded.data["runs"])
    index = out / "index.html"
    _write(index, env, "index.html", "", boards=boards, runs=runs.to_dict("records"))
    for run in runs.to_dict("records"):
        _write(out / run["href"], env, "run.html", "../", **_run_page(run, loaded))
    for board in boards:
        for a, b in board["comparisons"]:
            _write_comparison(out, env, loaded, board["key"], a, b)
    _write(out / "claims.html", env, "claims.html", "", claims=_claims_page(loaded, boards))
    (out / "style.css").write_text(env.loader.get_source(env, "style.css")[0], encoding="utf-8")
    return index


def render_comparison(store: Store, out_dir: str | Path, run_a: str, run_b: str,
                      claims_dir: str | Path | None = None) -> Path:
    """Write the comparison page of two runs' checkpoints (`RUN` or `RUN:last`; RUN is a run id, a
    unique prefix of one, or a unique label; the best checkpoint by default) on the leaderboard
    they share, and return its path."""
    out = _folder(out_dir, "compare")
    loaded = load(store, claims_dir)
    a, b = _pick_checkpoint(loaded, run_a), _pick_checkpoint(loaded, run_b)
    if a == b:
        raise BenchError(f"{run_a!r} and {run_b!r} are the same checkpoint: nothing to compare")
    attacks = loaded.data["attacks"]
    boards = set(map(tuple, attacks.loc[attacks["checkpoint_id"] == a, TM].values)) & \
        set(map(tuple, attacks.loc[attacks["checkpoint_id"] == b, TM].values))
    if not boards:
        raise BenchError(f"{run_a!r} and {run_b!r} share no leaderboard (dataset and threat model with attack "
                         f"evaluations of both): evaluate them alike first")
    paths = [_write_comparison(out, _environment(), loaded, key, a, b) for key in sorted(boards)]
    return paths[0]


def _folder(out_dir: str | Path, *subfolders: str) -> Path:
    """The report folder with these subfolders, created as needed; a BenchError when it cannot be."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BenchError(f"report folder {str(out)!r} is a file: give a folder (--out reports)")
    try:
        for sub in subfolders:
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot write the report into {str(out)!r}: {exc.strerror or exc}") from None
    return out


def _environment() -> Environment:
    return Environment(loader=PackageLoader("bench.app", "templates"), autoescape=select_autoescape(["html"]),
                       trim_blocks=True, lstrip_blocks=True)


def _write(path: Path, env: Environment, template: str, root: str, **values) -> None:
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(env.get_template(template).render(root=root, generated=generated, dash=DASH, **values),
                    encoding="utf-8")


# ----------------------------------------------------------------------------- loading

def leaderboard(store: Store) -> list[dict]:
    """One dict per leaderboard entry (dataset, threat model, checkpoint; superseded checkpoints
    left out), best worst case first on each board: name, kind, architecture (`model`), sha256,
    clean accuracy, worst case and its n, the adaptive worst case (`adaptive`, NaN where no remedy
    ran), the failed checks (`failed`) and the entry's leaderboard `evaluations` (label, attack,
    params, implementation, n_samples, robust_acc, evaluation_id)."""
    loaded = load(store)
    d, entries = loaded.data, loaded.entries
    rows = []
    for (dataset, threat), grp in d["attacks"].groupby(TM, sort=True):
        clean = d["clean"][d["clean"]["dataset"] == dataset].set_index("checkpoint_id")["robust_acc"]
        worst = loaded.worst[(loaded.worst["dataset"] == dataset) & (loaded.worst["threat"] == threat)]
        worst = worst.set_index("checkpoint_id")
        board = []
        for checkpoint_id, evs in grp.groupby("checkpoint_id"):
            e = entries.loc[checkpoint_id]
            if e["kind"] == "superseded":
                continue
            board.append({"dataset": dataset, "threat": threat, "norm": evs["norm"].iloc[0], "eps": evs["eps"].iloc[0],
                          "checkpoint_id": checkpoint_id, "sha256": e["sha256"], "name": e["name"], "kind": e["kind"],
                          "model": e["model"] if isinstance(e["model"], str) else None,
                          "clean": clean.get(checkpoint_id, np.nan),
                          "worst": worst["worst"].get(checkpoint_id, np.nan), "n": worst["n"].get(checkpoint_id, 0),
                          "adaptive": worst["adaptive"].get(checkpoint_id, np.nan),
                          "failed": [f["name"] for f in loaded.flags.get((checkpoint_id, threat), [])
                                     if f["status"] == "fail"],
                          "evaluations": [{"label": r.label, "attack": r.attack,
                                           "params": (r.config or {}).get("params", {}) if isinstance(r.config, dict)
                                           else {}, "implementation": r.implementation, "n_samples": r.n_samples,
                                           "robust_acc": r.robust_acc, "evaluation_id": r.evaluation_id}
                                          for r in evs.itertuples()]})
        rows += sorted(board, key=lambda r: (-(r["worst"] if pd.notna(r["worst"]) else -1), r["name"]))
    return rows


def load(store: Store, claims_dir: str | Path | None = None) -> Loaded:
    data = _load(store)
    entries = _entries(data)
    return Loaded(store, data, entries, _worst_case(store, data), _flags(data["sanity"], entries, data["remedies"]),
                  load_claims(claims_dir))


def _widest(ev: pd.DataFrame) -> pd.DataFrame:
    """Per checkpoint, dataset, threat model and label the evaluation on the most samples, then the
    newest (the rule of `widest_per_label`)."""
    ev = ev.sort_values(["n_samples", "created_at", "evaluation_id"])
    return ev.drop_duplicates(["checkpoint_id", "dataset", "label", "threat"], keep="last")


def _load(store: Store) -> dict[str, pd.DataFrame]:
    """The store's tables, the leaderboard evaluations (`_widest` of role "attack"), the adaptive
    ones (role "adaptive"), and the curve points with their evaluations."""
    d = store.tables()
    everything = d["evaluations"]
    ev = _widest(everything[everything["role"] == "attack"])
    clean = ev[ev["threat"].isna()].drop_duplicates(["dataset", "checkpoint_id"], keep="last")
    adaptive = _widest(everything[(everything["role"] == "adaptive") & everything["threat"].notna()])
    points = d["curve_points"].merge(d["curves"][["curve_id", "checkpoint_id", "name", "x_label"]], on="curve_id")
    points = points.merge(everything[["evaluation_id", "robust_acc", "mean_loss", "diagnostics", "n_samples"]],
                          on="evaluation_id")
    return {
        "runs": d["runs"].sort_values(["dataset", "label", "run_id"]),
        "epochs": d["epochs"].sort_values(["run_id", "epoch"]),
        "checkpoints": d["checkpoints"],
        "run_checkpoints": d["run_checkpoints"],
        "attacks": ev[ev["threat"].notna()].sort_values("evaluation_id"),
        "adaptive": adaptive.sort_values("evaluation_id"),
        "clean": clean,
        "sanity": d["sanity"],
        "remedies": d["remedies"],
        "curves": points.sort_values(["curve_id", "position"]),
    }


def _entries(d: dict) -> pd.DataFrame:
    """One entry per checkpoint (indexed by checkpoint_id), with the run it belongs to and the
    kinds it is of that run (best, last, planted-...; "best, last" when one file is both). A
    checkpoint a run no longer points at (an older best.pt) has no kind; one trained elsewhere has
    no run."""
    slots = d["run_checkpoints"].sort_values(["run_id", "kind"])
    kinds = slots.groupby("checkpoint_id")["kind"].agg(lambda k: ", ".join(dict.fromkeys(k)))
    ck = d["checkpoints"].set_index("checkpoint_id")[["run_id", "epoch", "path", "sha256", "config"]].join(kinds)
    ck = ck.rename(columns={"config": "checkpoint_config"})
    runs = d["runs"][["run_id", "label", "model", "status", "train_seconds", "forward_per_sample",
                      "backward_per_sample", "config", "defense"]]
    e = ck.reset_index().merge(runs, on="run_id", how="left").set_index("checkpoint_id")
    e["kind"] = e["kind"].where(e["kind"].notna(), np.where(e["run_id"].notna(), "superseded", "external"))
    # a model evaluated from outside (bench.engine.subject) records its name and architecture
    given = e["checkpoint_config"].map(lambda c: c if isinstance(c, dict) else {})
    e["label"] = e["label"].fillna(given.map(lambda c: c.get("name")))
    e["model"] = e["model"].fillna(given.map(lambda c: c.get("architecture")))
    e["name"] = e["label"].fillna(e["path"].map(lambda p: Path(p).name if p else "")).where(
        e["label"].notna() | e["path"].astype(bool), e["sha256"].str[:12])
    planted = e["kind"].str.startswith("planted-")
    e.loc[planted, "name"] = e.loc[planted, "name"] + " · " + e.loc[planted, "kind"]
    e["href"] = e["run_id"].map(fmt.run_href, na_action="ignore")
    e["cost"] = e["forward_per_sample"].fillna(0) + e["backward_per_sample"].fillna(0)
    e["cost"] = e["cost"].where(e["forward_per_sample"].notna() | e["backward_per_sample"].notna())
    return e


def _worst_case(store: Store, d: dict) -> pd.DataFrame:
    """Per-sample AND over every leaderboard attack of a threat model and the clean evaluation,
    over the samples that all of them cover (`Store.sample_matrix`); with the adaptive evaluations
    too where there are any. Columns: ROW + worst, n, mixed (sample sets differ), adaptive,
    adaptive_n."""
    rows = []
    for key, grp in d["attacks"].groupby(ROW, sort=False):
        dataset, threat, checkpoint_id = key
        clean = d["clean"][(d["clean"]["dataset"] == dataset) & (d["clean"]["checkpoint_id"] == checkpoint_id)]
        members = pd.concat([grp, clean])
        worst, n = store.sample_matrix(members["evaluation_id"].tolist()).worst_case()
        row = {"dataset": dataset, "threat": threat, "checkpoint_id": checkpoint_id, "worst": worst if n else None,
               "n": n, "mixed": members["indices_hash"].nunique() > 1, "adaptive": None, "adaptive_n": None}
        adaptive = d["adaptive"][(d["adaptive"]["checkpoint_id"] == checkpoint_id) & (d["adaptive"]["threat"] == threat)]
        if len(adaptive):
            acc, n_adaptive = store.sample_matrix(members["evaluation_id"].tolist()
                                                  + adaptive["evaluation_id"].tolist()).worst_case()
            row.update(adaptive=acc if n_adaptive else None, adaptive_n=n_adaptive)
        rows.append(row)
    return pd.DataFrame(rows, columns=ROW + ["worst", "n", "mixed", "adaptive", "adaptive_n"])


def check_anchor(checkpoint_id, threat: str, name: str) -> str:
    """The id of a check's section on its run page."""
    return fmt.slug(f"check-{checkpoint_id}-{threat}-{name}")


def check_meaning(name: str) -> str:
    """What a check expects, in one sentence: the first sentence of its docstring."""
    if name not in CHECKS:
        return ""
    doc = " ".join((CHECKS.get(name).__doc__ or "").split())
    end = re.search(r"(?<!\bal)(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z(])", doc)
    return doc if end is None else doc[:end.start() + 1]


def _flags(sanity: pd.DataFrame, entries: pd.DataFrame, remedies: pd.DataFrame) -> dict[tuple, list[dict]]:
    """Failed and warned sanity checks per (checkpoint, threat model), failures first, each with
    its explanation (for hovering), the link to its section on the run page and what the adaptive
    stage did about it (`remedy`: "BPDA surrogate → 55.5% (closed)", or empty)."""
    remedied = _remedied(remedies)
    bad = sanity[sanity["status"].isin(["fail", "warn"])]
    bad = bad.assign(order=bad["status"].map(STATUS_ORDER)).sort_values(["order", "name"])
    flags: dict[tuple, list[dict]] = {}
    for r in bad.itertuples():
        href = entries["href"].get(r.checkpoint_id)
        remedy = remedied.get((r.checkpoint_id, r.threat, r.name), "")
        flags.setdefault((r.checkpoint_id, r.threat), []).append({
            "name": r.name, "status": r.status, "remedy": remedy,
            "href": f"{href}#{check_anchor(r.checkpoint_id, r.threat, r.name)}" if isinstance(href, str) else None,
            "title": " ".join(x for x in (f"{r.status.upper()} {r.name}: {check_meaning(r.name)}", _text(r.summary),
                                          f"(value {fmt.num(r.value)}, threshold {fmt.num(r.threshold)})",
                                          f"Adaptive: {remedy}." if remedy else "") if x)})
    return flags


def _remedied(remedies: pd.DataFrame) -> dict[tuple, str]:
    """(checkpoint_id, threat, check) → what the adaptive stage did about that flag, in a few words
    (`bench.engine.adaptive.describe`), for the flags a remedy was tried on."""
    return {(r.checkpoint_id, r.threat, r.check): describe(r) for r in remedies.itertuples() if r.status != "none"}


# ----------------------------------------------------------------------------- leaderboards

def _views(kind: str) -> list[str]:
    """The checkpoint views a row belongs to: best and/or last; a checkpoint that is neither (one
    trained elsewhere, a planted variant) shows in both."""
    kinds = kind.split(", ")
    return [v for v in VIEWS if v in kinds] or list(VIEWS)


def _ranks(df: pd.DataFrame) -> pd.Series:
    """Rank by worst case, then clean accuracy; ties share the best rank; unranked without a worst case."""
    rank = pd.Series(np.arange(1, len(df) + 1), index=df.index)
    rank = rank.groupby([df["worst"], df["robust_acc"]], dropna=False).transform("min")
    return rank.where(df["worst"].notna())


def _board(key: tuple, grp: pd.DataFrame, loaded: Loaded) -> dict:
    dataset, threat = key
    d, entries = loaded.data, loaded.entries
    norm, eps = grp["norm"].iloc[0], grp["eps"].iloc[0]
    grp = grp[~grp["checkpoint_id"].map(entries["kind"]).eq("superseded")]
    anchor = fmt.slug(f"{dataset}-{norm}-{eps:g}")
    labels = list(grp["label"].unique())                       # suite order (evaluation id)
    n_table = int(grp["n_samples"].mode().max())
    acc = grp.pivot(index="checkpoint_id", columns="label", values="robust_acc")[labels]
    n = grp.pivot(index="checkpoint_id", columns="label", values="n_samples")[labels]
    clean = d["clean"][d["clean"]["dataset"] == dataset].set_index("checkpoint_id")
    w = loaded.worst[(loaded.worst["dataset"] == dataset) & (loaded.worst["threat"] == threat)]
    df = pd.DataFrame(index=acc.index).join(entries).join(clean[["robust_acc", "n_samples"]])
    df = df.join(w.set_index("checkpoint_id")[["worst", "n", "mixed", "adaptive", "adaptive_n"]])
    df = df.sort_values(["worst", "robust_acc", "name"], ascending=[False, False, True], na_position="last")
    df["views"] = df["kind"].fillna("").map(_views)
    for view in VIEWS:
        df[f"rank_{view}"] = _ranks(df[df["views"].map(lambda v, view=view: view in v)]).reindex(df.index)
    df["rank"] = _ranks(df)
    leaders = {v: _leaders(df, v) for v in VIEWS}
    comparisons, rows = set(), []
    for checkpoint_id, r in df.iterrows():
        pair = _comparison(checkpoint_id, leaders[r["views"][0]])
        if pair:
            comparisons.add(pair)
        claims = _claimed(loaded.claims, r, dataset, norm, eps, grp[grp["checkpoint_id"] == checkpoint_id])
        rows.append({
            "checkpoint_id": checkpoint_id, "name": r["name"], "href": r["href"], "status": r["status"],
            "model": r["model"] if isinstance(r["model"], str) else DASH, "kind": r["kind"],
            "views": " ".join(r["views"]), "flagged": bool(loaded.flags.get((checkpoint_id, threat))),
            "rank": {"all": fmt.integer(r["rank"]), **{v: fmt.integer(r[f"rank_{v}"]) for v in VIEWS}},
            "clean": _cell(r["robust_acc"], r["n_samples"], n_table),
            "cells": [_cell(a, m, n_table) for a, m in zip(acc.loc[checkpoint_id].values, n.loc[checkpoint_id].values)],
            "worst": _cell(r["worst"], r["n"], n_table, force=bool(r["mixed"])),
            "adaptive": _cell(r["adaptive"], r["adaptive_n"], n_table),
            "cost": {"text": fmt.num(r["cost"]), "value": "" if pd.isna(r["cost"]) else f"{r['cost']:.6g}"},
            "train": fmt.duration(r["train_seconds"]), "train_value": "" if pd.isna(r["train_seconds"])
            else f"{r['train_seconds']:.6g}",
            "passes": fmt.passes(r["forward_per_sample"], r["backward_per_sample"]),
            "flags": loaded.flags.get((checkpoint_id, threat), []),
            "claims": claims, "claim_cell": _claim_cell(claims),
            "compare": None if pair is None else {"href": _compare_href(anchor, *pair),
                                                  "title": f"compare with #{2 if pair[0] == checkpoint_id else 1}"}})
    title = f"{dataset} · {norm} ε = {format_eps(eps)}"
    points = [{"name": r["name"], "href": r["href"], "cost": r["cost"], "worst": r["worst"], "adaptive": r["adaptive"]}
              for _, r in df.iterrows() if "best" in r["views"] and isinstance(r["href"], str)]
    return {"key": key, "title": title, "anchor": anchor, "labels": labels, "n": n_table, "rows": rows,
            "adaptive": bool(df["adaptive"].notna().any()), "comparisons": sorted(comparisons),
            "plot": cost_plot(f"Worst case against training cost · {title}", points),
            "unplotted": int(sum(1 for p in points if pd.isna(p["cost"]) or pd.isna(p["worst"]))),
            "claimed": [{"row": row["name"], "href": row["href"], "kind": row["kind"], **c}
                        for row in rows for c in row["claims"]]}


def _leaders(df: pd.DataFrame, view: str) -> list:
    """The checkpoints of a view that have a worst case, best first."""
    ranked = df[df["views"].map(lambda v: view in v) & df["worst"].notna()]
    return list(ranked.index)


def _comparison(checkpoint_id, ranked: list) -> tuple | None:
    """The comparison a row links to: its view's leader against it, or the leader against the
    runner-up; None for a row without a worst case or alone in its view."""
    if len(ranked) < 2 or checkpoint_id not in ranked:
        return None
    return (ranked[0], ranked[1]) if checkpoint_id == ranked[0] else (ranked[0], checkpoint_id)


def _compare_href(anchor: str, a, b) -> str:
    return f"compare/{anchor}--{a}-vs-{b}.html"


def _cell(acc, n, n_table: int, force: bool = False) -> dict:
    """A percentage with a note "n=…" when its sample count differs from the table's, and the
    value the leaderboard sorts by."""
    note = f"n={int(n)}" if pd.notna(n) and (force or int(n) != n_table) else ""
    return {"text": fmt.pct(acc), "note": note, "value": "" if pd.isna(acc) else f"{acc:.6g}"}


# ----------------------------------------------------------------------------- claims

def _claimed(claims: list[Claim], row: pd.Series, dataset: str, norm: str, eps: float,
             evaluations: pd.DataFrame) -> list[dict]:
    """The claims of the row's setting, each metric claimed next to measured and their difference."""
    config = row["config"] if isinstance(row["config"], dict) else None
    names = tuple(x for x in (Path(row["path"]).stem if isinstance(row["path"], str) else None,
                              row["label"] if isinstance(row["label"], str) else None) if x)
    matched = [(k, c) for k, c in enumerate(claims) if c.matches(dataset, norm, eps, config, names)]
    if not matched:
        return []
    measured = {"clean": (row["robust_acc"], "clean", ""), **_measured(evaluations)}
    out = []
    for key, claim in matched:
        metrics = []
        for metric, title in (("clean", "Clean"), ("pgd20", "PGD-20"), ("autoattack", "AutoAttack")):
            claimed = getattr(claim, metric)
            value, label, note = measured.get(metric, (np.nan, "", ""))
            metrics.append({"metric": title, "claimed": DASH if claimed is None else f"{claimed:.2f}",
                            "measured": fmt.pct(value), "label": label, "note": note,
                            "diff": DASH if claimed is None or pd.isna(value) else fmt.signed_pct(value - claimed / 100)})
        out.append({**_claim_fields(claim), "key": key, "metrics": metrics})
    return out


def _measured(evaluations: pd.DataFrame) -> dict[str, tuple[float, str, str]]:
    """The row's PGD-20 (cross-entropy, 20 steps) and AutoAttack (standard version) accuracies, with
    their labels and, for AutoAttack, the parameters that differ from the attack's defaults."""
    out = {}
    for r in evaluations.itertuples():
        params = (r.config or {}).get("params", {}) if isinstance(r.config, dict) else {}
        if r.attack == "pgd" and params.get("steps") == 20 and params.get("loss", "ce") == "ce" and "pgd20" not in out:
            out["pgd20"] = (r.robust_acc, r.label, "")
        if r.attack == "autoattack" and params.get("version", "standard") == "standard" and "autoattack" not in out:
            out["autoattack"] = (r.robust_acc, r.label, _budget_note(r.attack, params))
    return out


def _budget_note(attack: str, params: dict) -> str:
    """The parameters of a stored evaluation that differ from the attack's defaults."""
    try:
        defaults = ATTACKS.get(attack)(norm=params["norm"], eps=params["eps"]).params()
    except (BenchError, KeyError, TypeError):
        return ""
    changed = sorted((k, v) for k, v in params.items() if defaults.get(k) != v)
    return ("not the paper's budget: " + ", ".join(f"{k}={v}" for k, v in changed)) if changed else ""


def _claim_fields(claim: Claim) -> dict:
    return {"paper": claim.paper, "method": claim.method, "table": claim.table or DASH,
            "page": DASH if claim.page is None else str(claim.page), "source": claim.source, "note": claim.note,
            "origin": claim.origin}


def _claim_cell(claims: list[dict]) -> dict | None:
    """The leaderboard's short form: the strongest metric both sides have, claimed → measured."""
    for claim in claims:
        for metric in reversed(claim["metrics"]):
            if metric["diff"] != DASH:
                return {"text": f"{metric['claimed']} → {metric['measured']}", "diff": metric["diff"],
                        "title": f"{claim['method']} ({claim['paper']}, {claim['table']}): {metric['metric']} claimed "
                                 f"{metric['claimed']}%, measured {metric['measured']}% ({metric['label']})"}
    return None


def _claims_page(loaded: Loaded, boards: list[dict]) -> list[dict]:
    """Every claim, with the leaderboard rows that measure its setting."""
    matched: dict[int, list[dict]] = {}
    for board in boards:
        for row in board["rows"]:
            for claim in row["claims"]:
                matched.setdefault(claim["key"], []).append(
                    {"name": row["name"], "href": row["href"], "kind": row["kind"], "board": board["title"],
                     "anchor": board["anchor"]})
    out = []
    for key, claim in enumerate(loaded.claims):
        fields = _claim_fields(claim)
        out.append({**fields, "dataset": claim.dataset, "architecture": claim.architecture,
                    "threat": fmt.threat(claim.norm, claim.eps),
                    "clean": "not reported" if claim.clean is None else f"{claim.clean:.2f}",
                    "pgd20": "not reported" if claim.pgd20 is None else f"{claim.pgd20:.2f}",
                    "autoattack": "not reported" if claim.autoattack is None else f"{claim.autoattack:.2f}",
                    "matchable": claim.model is not None or claim.model_id is not None,
                    "rows": matched.get(key, [])})
    return out


# ----------------------------------------------------------------------------- comparison pages

def _write_comparison(out: Path, env: Environment, loaded: Loaded, key: tuple, a: int, b: int) -> Path:
    """Render the comparison of checkpoints `a` and `b` on the leaderboard `key`."""
    dataset, threat = key
    d, entries = loaded.data, loaded.entries

    def members(frame: pd.DataFrame, checkpoint_id: int) -> pd.DataFrame:
        return frame[(frame["checkpoint_id"] == checkpoint_id) & (frame["dataset"] == dataset)
                     & (frame["threat"] == threat)]

    def with_clean(checkpoint_id: int) -> pd.DataFrame:
        clean = d["clean"][(d["clean"]["checkpoint_id"] == checkpoint_id) & (d["clean"]["dataset"] == dataset)]
        return pd.concat([clean, members(d["attacks"], checkpoint_id)])

    norm, eps = fmt.split_threat(threat)
    result = compare(loaded.store, with_clean(a), with_clean(b), members(d["adaptive"], a), members(d["adaptive"], b),
                     eps, norm)
    anchor = fmt.slug(f"{dataset}-{norm}-{eps:g}")
    path = out / _compare_href(anchor, a, b)

    def side(checkpoint_id: int) -> dict:
        e = entries.loc[checkpoint_id]
        return {"name": e["name"], "kind": e["kind"], "href": e["href"] if isinstance(e["href"], str) else None,
                "model": e["model"] if isinstance(e["model"], str) else DASH}

    _write(path, env, "compare.html", "../", a=side(a), b=side(b), board=f"{dataset} · {fmt.threat(norm, eps)}",
           anchor=anchor, **result)
    return path


def _pick_checkpoint(loaded: Loaded, text: str) -> int:
    """The checkpoint named by `RUN` or `RUN:KIND` (see `render_comparison`)."""
    name, _, kind = text.partition(":")
    kind = kind or "best"
    runs = loaded.data["runs"]
    found = runs[runs["run_id"] == name]
    if found.empty:
        found = runs[runs["run_id"].str.startswith(name) | (runs["label"] == name)]
    if len(found) != 1:
        known = ", ".join(f"{r.label} ({r.run_id})" for r in runs.itertuples()) or "none"
        raise BenchError(f"{name!r} names {'no' if found.empty else len(found)} runs; give a run id, a unique prefix "
                         f"of one, or a unique label (runs: {known})")
    slots = loaded.data["run_checkpoints"]
    slot = slots[(slots["run_id"] == found["run_id"].iloc[0]) & (slots["kind"] == kind)]
    if slot.empty:
        raise BenchError(f"run {name!r} has no {kind!r} checkpoint (it has "
                         f"{', '.join(slots.loc[slots['run_id'] == found['run_id'].iloc[0], 'kind']) or 'none'})")
    return int(slot["checkpoint_id"].iloc[0])


# ----------------------------------------------------------------------------- run pages

def _format_runs(runs: pd.DataFrame) -> pd.DataFrame:
    r = runs.copy()
    r["href"] = r["run_id"].map(fmt.run_href)
    r["threat"] = [fmt.threat(n, e) for n, e in zip(r["norm"], r["eps"])]
    r["train"] = r["train_seconds"].map(fmt.duration)
    r["passes"] = [fmt.passes(f, b) for f, b in zip(r["forward_per_sample"], r["backward_per_sample"])]
    r["best_epoch"] = r["best_epoch"].map(fmt.integer)
    r["created_at"] = r["created_at"].map(fmt.time)
    r["updated_at"] = r["updated_at"].map(fmt.time)
    r["config_json"] = r["config"].map(lambda c: json.dumps(c, indent=2, sort_keys=True, default=str))
    r["versions"] = r["versions"].map(lambda v: ", ".join(f"{k} {x}" for k, x in sorted((v or {}).items())) or DASH)
    return r.fillna({"git_commit": DASH, "device": DASH, "error": ""})


def _run_page(run: dict, loaded: Loaded) -> dict:
    d, entries = loaded.data, loaded.entries
    ep = d["epochs"][d["epochs"]["run_id"] == run["run_id"]]
    log = pd.DataFrame({"epoch": ep["epoch"], "loss": ep["loss"].map("{:.4f}".format),
                        "clean": ep["clean_acc"].map(fmt.pct), "robust": ep["robust_acc"].map(fmt.pct),
                        "lr": ep["lr"].map("{:.3g}".format), "seconds": ep["seconds"].map("{:.1f}".format)})
    checkpoints = []
    remedied = _remedied(d["remedies"])
    evs = pd.concat([d["clean"], d["attacks"], d["adaptive"]])
    own = entries[(entries["run_id"] == run["run_id"]) & (entries["kind"] != "superseded")]
    for checkpoint_id, e in own.iterrows():
        ev = evs[evs["checkpoint_id"] == checkpoint_id].sort_values("evaluation_id")
        w = loaded.worst[loaded.worst["checkpoint_id"] == checkpoint_id]
        san = d["sanity"][d["sanity"]["checkpoint_id"] == checkpoint_id].copy()
        san = san.assign(order=san["status"].map(STATUS_ORDER)).sort_values(["norm", "eps", "order", "name"])
        checkpoints.append({
            "kind": e["kind"], "epoch": fmt.integer(e["epoch"]), "sha": e["sha256"], "path": e["path"],
            "evaluations": [_evaluation_row(r) for r in ev.itertuples()],
            "worst": [{"threat": fmt.threat(*fmt.split_threat(r.threat)), "acc": fmt.pct(r.worst), "n": fmt.integer(r.n),
                       "adaptive": fmt.pct(r.adaptive), "adaptive_n": fmt.integer(r.adaptive_n)}
                      for r in w.itertuples()],
            "sanity": [_check_section(r, remedied) for r in san.itertuples()],
            "charts": _curve_charts(d["curves"][d["curves"]["checkpoint_id"] == checkpoint_id])})
    best = int(run["best_epoch"]) if run["best_epoch"] != DASH else None
    charts = [] if ep.empty else [
        line_chart("Validation accuracy per epoch", "epoch", "accuracy %",
                   [("clean", ep["epoch"].tolist(), ep["clean_acc"].tolist()),
                    ("robust", ep["epoch"].tolist(), ep["robust_acc"].tolist())], percent=True, marker=best),
        line_chart("Training loss per epoch", "epoch", "loss", [("loss", ep["epoch"].tolist(), ep["loss"].tolist())]),
        line_chart("Learning rate per epoch", "epoch", "learning rate", [("lr", ep["epoch"].tolist(), ep["lr"].tolist())]),
    ]
    return {"run": run, "log": log.to_dict("records"), "charts": charts, "checkpoints": checkpoints}


def _evaluation_row(r) -> dict:
    """An evaluation on the run page, with its cost per attacked sample."""
    n = r.n_samples or 1
    return {"label": r.label, "attack": r.attack, "role": r.role, "threat": fmt.threat(r.norm, r.eps),
            "acc": fmt.pct(r.robust_acc), "n": r.n_samples, "fwd": fmt.num(r.forward_passes / n),
            "bwd": fmt.num(r.backward_passes / n), "seconds": f"{r.seconds:.1f}",
            "ms": f"{1000 * r.seconds / n:.3g}", "impl": r.implementation, "notes": _notes(r.diagnostics)}


def _check_section(r, remedied: dict[tuple, str]) -> dict:
    """A sanity check as people read it: what it expects, what was measured, the evidence, and
    what the adaptive stage did about it."""
    return {"name": r.name, "status": r.status, "threat": fmt.threat(r.norm, r.eps),
            "remedy": remedied.get((r.checkpoint_id, r.threat, r.name), ""),
            "anchor": check_anchor(r.checkpoint_id, r.threat, r.name), "value": fmt.num(r.value),
            "threshold": fmt.num(r.threshold), "summary": _text(r.summary), "expects": check_meaning(r.name),
            "meaning": STATUS_MEANING.get(r.status, ""),
            "evidence": [_evidence_item(k, v) for k, v in sorted((r.evidence or {}).items())]}


def _text(value) -> str:
    """A text column's value, "" for a missing one."""
    return value if isinstance(value, str) else ""


def _evidence_item(key: str, value) -> dict:
    """One evidence entry, readable: the interval as [lower, upper] (in the units of the check's
    value), sample indices as a compact list, numbers to four digits, small mappings inline."""
    name = key.replace("_", " ")
    if key == "ci" and isinstance(value, list) and len(value) == 2:
        return {"name": "95% interval", "text": f"[{_evidence_value(value[0])}, {_evidence_value(value[1])}]"}
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return {"name": f"{name} (sample indices)" if value else name, "text": fmt.sample_list(value)}
    if isinstance(value, dict):
        return {"name": name, "text": "; ".join(f"{k}: {_evidence_value(v)}" for k, v in value.items()) or DASH}
    return {"name": name, "text": _evidence_value(value)}


def _evidence_value(value) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return fmt.num(value) if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return ", ".join(_evidence_value(v) for v in value) or DASH
    return str(value)


def _notes(diagnostics) -> str:
    """A short text of what an evaluation recorded besides accuracy (the full record is in the store)."""
    if not isinstance(diagnostics, dict) or not diagnostics:
        return ""
    notes = []
    if diagnostics.get("silent_success"):
        notes.append(f"{diagnostics['silent_success']} silent successes")
    if "mean_norm" in diagnostics:
        notes.append(f"found {diagnostics.get('found')}, mean norm {diagnostics['mean_norm']:.4g}, "
                     f"median {diagnostics['median_norm']:.4g}")
    stats = dict(diagnostics.get("stats") or {})
    if isinstance(stats.get("robust_after"), dict):
        notes.append("robust after " + " → ".join(f"{k} {v}" for k, v in stats.pop("robust_after").items()))
    stats.pop("components", None)  # the configuration: in the evaluation's provenance
    notes += [f"{key} {fmt.num(value) if isinstance(value, (int, float)) else value}"
              for key, value in sorted(stats.items()) if not isinstance(value, (dict, list)) or value]
    return "; ".join(notes)


CURVE_CHARTS = (  # title, x label, curve names (series), value column, percent, log x
    ("Accuracy against eps", "eps", ("eps:fgsm", "eps:pgd"), "robust_acc", True, False),
    ("Mean cross-entropy against eps", "eps", ("eps:fgsm", "eps:pgd"), "mean_loss", False, False),
    ("Accuracy against PGD steps (fixed step size)", "steps", ("steps:pgd",), "robust_acc", True, True),
    ("Accuracy against PGD restarts", "restarts", ("restarts:pgd",), "robust_acc", True, False),
)


def _curve_charts(points: pd.DataFrame) -> list[dict]:
    charts = []
    for title, x_label, names, column, percent, log_x in CURVE_CHARTS:
        series = [(name.split(":")[1].upper(), g["x"].tolist(), g[column].tolist())
                  for name in names for _, g in [(name, points[points["name"] == name])] if len(g)]
        if series:
            charts.append(line_chart(title, x_label, "accuracy %" if percent else "mean loss", series,
                                     percent=percent, log_x=log_x))
    steps = points[points["name"] == "steps:pgd"]
    if len(steps):
        trace = steps.iloc[-1]["diagnostics"]
        if isinstance(trace, dict) and trace.get("loss_trace"):
            values, total = trace["loss_trace"], int(steps.iloc[-1]["x"])
            xs = [round(k * total / max(len(values) - 1, 1)) for k in range(len(values))]
            charts.append(line_chart(f"Mean cross-entropy along the {total}-step PGD trajectory", "step",
                                     "mean loss", [("PGD", xs, values)]))
    return charts
