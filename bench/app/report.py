"""Static HTML report: one leaderboard per (dataset, threat model) and one page per run.

Reads the store with pandas, sorts and formats there, and renders the Jinja templates in
`bench/templates` (autoescape on) into `out_dir`: `index.html`, `runs/<run_id>.html`,
`style.css`. Static files with relative links only, so the report opens from disk.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from bench.core.errors import BenchError
from bench.core.threat import format_eps
from bench.engine.adaptive import describe
from bench.store import Store

DASH = "—"
STATUS_ORDER = {"fail": 0, "warn": 1, "pass": 2, "not-run": 3}
TM = ["dataset", "threat"]                       # one leaderboard
ROW = TM + ["checkpoint_id"]                      # one leaderboard row


def render_report(store: Store, out_dir: str | Path = "reports") -> Path:
    """Write the report into `out_dir` and return the path of its `index.html`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BenchError(f"report folder {str(out)!r} is a file: give a folder (--out reports)")
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot write the report into {str(out)!r}: {exc.strerror or exc}") from None
    for stale in (out / "runs").glob("*.html"):
        stale.unlink()
    d = _load(store)
    entries = _entries(d)
    worst = _worst_case(store, d)
    flags = _flags(d["sanity"], d["remedies"])
    env = Environment(loader=PackageLoader("bench.app", "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    common = {"generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "dash": DASH}
    boards = [_board(key, grp, d, entries, worst, flags) for key, grp in d["attacks"].groupby(TM, sort=True)]
    runs = _format_runs(d["runs"])
    index = out / "index.html"
    index.write_text(env.get_template("index.html").render(root="", boards=boards, runs=runs.to_dict("records"),
                                                            **common), encoding="utf-8")
    for run in runs.to_dict("records"):
        page = _run_page(run, d, entries, worst)
        (out / run["href"]).write_text(env.get_template("run.html").render(root="../", **page, **common),
                                       encoding="utf-8")
    (out / "style.css").write_text(env.loader.get_source(env, "style.css")[0], encoding="utf-8")
    return index


# ----------------------------------------------------------------------------- loading

def _load(store: Store) -> dict[str, pd.DataFrame]:
    """The store's tables, the leaderboard evaluations (per checkpoint, dataset, threat model and
    label the one on the most samples, then the newest: the rule of `widest_per_label`) and the
    curve points with their evaluations."""
    d = store.tables()
    everything = d["evaluations"]
    ev = everything[everything["role"] == "attack"].sort_values(["n_samples", "created_at", "evaluation_id"])
    ev = ev.drop_duplicates(["checkpoint_id", "dataset", "label", "threat"], keep="last")
    clean = ev[ev["threat"].isna()].drop_duplicates(["dataset", "checkpoint_id"], keep="last")
    points = d["curve_points"].merge(d["curves"][["curve_id", "checkpoint_id", "name", "x_label"]], on="curve_id")
    points = points.merge(everything[["evaluation_id", "robust_acc", "mean_loss", "diagnostics", "n_samples"]],
                          on="evaluation_id")
    return {
        "runs": d["runs"].sort_values(["dataset", "label", "run_id"]),
        "epochs": d["epochs"].sort_values(["run_id", "epoch"]),
        "checkpoints": d["checkpoints"],
        "run_checkpoints": d["run_checkpoints"],
        "attacks": ev[ev["threat"].notna()].sort_values("evaluation_id"),
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
    ck = d["checkpoints"].set_index("checkpoint_id")[["run_id", "epoch", "path", "sha256"]].join(kinds)
    runs = d["runs"][["run_id", "label", "model", "status", "train_seconds", "forward_per_sample",
                      "backward_per_sample"]]
    e = ck.reset_index().merge(runs, on="run_id", how="left").set_index("checkpoint_id")
    e["kind"] = e["kind"].where(e["kind"].notna(), np.where(e["run_id"].notna(), "superseded", "external"))
    e["name"] = e["label"].fillna(e["path"].map(lambda p: Path(p).name if p else "")).where(
        e["label"].notna() | e["path"].astype(bool), e["sha256"].str[:12])
    planted = e["kind"].str.startswith("planted-")
    e.loc[planted, "name"] = e.loc[planted, "name"] + " · " + e.loc[planted, "kind"]
    e["href"] = e["run_id"].map(_run_href, na_action="ignore")
    return e


def _worst_case(store: Store, d: dict) -> pd.DataFrame:
    """Per-sample AND over every leaderboard attack of a threat model and the clean evaluation,
    over the samples that all of them cover (`Store.sample_matrix`). Columns: ROW + worst, n,
    mixed (sample sets differ)."""
    rows = []
    for key, grp in d["attacks"].groupby(ROW, sort=False):
        dataset, threat, checkpoint_id = key
        clean = d["clean"][(d["clean"]["dataset"] == dataset) & (d["clean"]["checkpoint_id"] == checkpoint_id)]
        members = pd.concat([grp, clean])
        worst, n = store.sample_matrix(members["evaluation_id"].tolist()).worst_case()
        rows.append({"dataset": dataset, "threat": threat, "checkpoint_id": checkpoint_id, "worst": worst if n else None,
                     "n": n, "mixed": members["indices_hash"].nunique() > 1})
    return pd.DataFrame(rows, columns=ROW + ["worst", "n", "mixed"])


def _flags(sanity: pd.DataFrame, remedies: pd.DataFrame) -> dict[tuple, list[dict]]:
    """Failed and warned sanity checks per (checkpoint, threat model), failures first, each with
    what the adaptive stage did about it (`remedy`: "BPDA surrogate → 55.5% (closed)", or empty)."""
    bad = sanity[sanity["status"].isin(["fail", "warn"])]
    remedied = {(r.checkpoint_id, r.threat, r.check): describe(r) for r in remedies.itertuples() if r.status != "none"}
    bad = bad.assign(order=bad["status"].map(STATUS_ORDER),
                     remedy=[remedied.get(key, "") for key in zip(bad["checkpoint_id"], bad["threat"], bad["name"])])
    bad = bad.assign(title=[f"{st}: {summary or ''} (value {_num(v)}, threshold {_num(t)})"
                            + (f"; adaptive: {remedy}" if remedy else "")
                            for st, summary, v, t, remedy in zip(bad["status"], bad["summary"], bad["value"],
                                                                 bad["threshold"], bad["remedy"])])
    bad = bad.sort_values(["order", "name"])
    return {key: g[["name", "status", "title", "remedy"]].to_dict("records")
            for key, g in bad.groupby(["checkpoint_id", "threat"])}


# ----------------------------------------------------------------------------- leaderboards

def _board(key: tuple, grp: pd.DataFrame, d: dict, entries: pd.DataFrame, worst: pd.DataFrame,
           flags: dict) -> dict:
    dataset, threat = key
    norm, eps = grp["norm"].iloc[0], grp["eps"].iloc[0]
    grp = grp[~grp["checkpoint_id"].map(entries["kind"]).eq("superseded")]
    labels = list(grp["label"].unique())                       # suite order (evaluation id)
    n_table = int(grp["n_samples"].mode().max())
    acc = grp.pivot(index="checkpoint_id", columns="label", values="robust_acc")[labels]
    n = grp.pivot(index="checkpoint_id", columns="label", values="n_samples")[labels]
    clean = d["clean"][d["clean"]["dataset"] == dataset].set_index("checkpoint_id")
    w = worst[(worst["dataset"] == dataset) & (worst["threat"] == threat)]
    df = pd.DataFrame(index=acc.index).join(entries).join(clean[["robust_acc", "n_samples"]])
    df = df.join(w.set_index("checkpoint_id")[["worst", "n", "mixed"]])
    df = df.sort_values(["worst", "robust_acc", "name"], ascending=[False, False, True], na_position="last")
    df["rank"] = np.arange(1, len(df) + 1)
    df["rank"] = df.groupby(["worst", "robust_acc"], dropna=False)["rank"].transform("min")
    df["rank"] = df["rank"].where(df["worst"].notna()).map(_int)
    df["clean"] = [_cell(a, m, n_table) for a, m in zip(df["robust_acc"], df["n_samples"])]
    df["cells"] = [[_cell(a, m, n_table) for a, m in zip(ra, rn)] for ra, rn in zip(acc.loc[df.index].values,
                                                                                 n.loc[df.index].values)]
    df["worst_cell"] = [_cell(a, m, n_table, force=bool(x)) for a, m, x in zip(df["worst"], df["n"], df["mixed"])]
    df["train"] = df["train_seconds"].map(_duration)
    df["passes"] = [_passes(f, b) for f, b in zip(df["forward_per_sample"], df["backward_per_sample"])]
    df["flags"] = [flags.get((checkpoint_id, threat), []) for checkpoint_id in df.index]
    for col in ("model", "kind", "status"):
        df[col] = df[col].fillna(DASH)
    return {"title": f"{dataset} · {norm} ε = {format_eps(eps)}", "anchor": _slug(f"{dataset}-{norm}-{eps:g}"),
            "labels": labels, "n": n_table, "rows": df.to_dict("records")}


def _cell(acc, n, n_table: int, force: bool = False) -> dict:
    """A percentage with a note "n=…" when its sample count differs from the table's."""
    note = f"n={int(n)}" if pd.notna(n) and (force or int(n) != n_table) else ""
    return {"text": _pct(acc), "note": note}


# ----------------------------------------------------------------------------- run pages

def _format_runs(runs: pd.DataFrame) -> pd.DataFrame:
    r = runs.copy()
    r["href"] = r["run_id"].map(_run_href)
    r["threat"] = [f"{n} ε = {format_eps(e)}" for n, e in zip(r["norm"], r["eps"])]
    r["train"] = r["train_seconds"].map(_duration)
    r["passes"] = [_passes(f, b) for f, b in zip(r["forward_per_sample"], r["backward_per_sample"])]
    r["best_epoch"] = r["best_epoch"].map(_int)
    r["created_at"] = r["created_at"].map(_time)
    r["updated_at"] = r["updated_at"].map(_time)
    r["config_json"] = r["config"].map(lambda c: json.dumps(c, indent=2, sort_keys=True, default=str))
    r["versions"] = r["versions"].map(lambda v: ", ".join(f"{k} {x}" for k, x in sorted((v or {}).items())) or DASH)
    return r.fillna({"git_commit": DASH, "device": DASH, "error": ""})


def _run_page(run: dict, d: dict, entries: pd.DataFrame, worst: pd.DataFrame) -> dict:
    ep = d["epochs"][d["epochs"]["run_id"] == run["run_id"]]
    log = pd.DataFrame({"epoch": ep["epoch"], "loss": ep["loss"].map("{:.4f}".format),
                        "clean": ep["clean_acc"].map(_pct), "robust": ep["robust_acc"].map(_pct),
                        "lr": ep["lr"].map("{:.3g}".format), "seconds": ep["seconds"].map("{:.1f}".format)})
    checkpoints, evs = [], pd.concat([d["clean"], d["attacks"]])
    own = entries[(entries["run_id"] == run["run_id"]) & (entries["kind"] != "superseded")]
    for checkpoint_id, e in own.iterrows():
        ev = evs[evs["checkpoint_id"] == checkpoint_id].sort_values("evaluation_id")
        w = worst[worst["checkpoint_id"] == checkpoint_id]
        san = d["sanity"][d["sanity"]["checkpoint_id"] == checkpoint_id].copy()
        san = san.assign(order=san["status"].map(STATUS_ORDER)).sort_values(["norm", "eps", "order", "name"])
        checkpoints.append({
            "kind": e["kind"], "epoch": _int(e["epoch"]), "sha": e["sha256"], "path": e["path"],
            "evaluations": [{"label": r.label, "attack": r.attack, "threat": _threat(r.norm, r.eps),
                             "acc": _pct(r.robust_acc), "n": r.n_samples, "fwd": r.forward_passes,
                             "bwd": r.backward_passes, "seconds": f"{r.seconds:.1f}",
                             "impl": r.implementation, "notes": _notes(r.diagnostics)} for r in ev.itertuples()],
            "worst": [{"threat": _threat(*_split_threat(r.threat)), "acc": _pct(r.worst), "n": _int(r.n)}
                      for r in w.itertuples()],
            "sanity": [{"name": r.name, "status": r.status, "threat": _threat(r.norm, r.eps), "value": _num(r.value),
                        "threshold": _num(r.threshold), "summary": r.summary or "",
                        "evidence": json.dumps(r.evidence, sort_keys=True, default=str) if r.evidence else DASH}
                       for r in san.itertuples()],
            "charts": _curve_charts(d["curves"][d["curves"]["checkpoint_id"] == checkpoint_id])})
    best = int(run["best_epoch"]) if run["best_epoch"] != DASH else None
    chart = None if ep.empty else line_chart(
        "Validation accuracy per epoch", "epoch", "accuracy %",
        [("clean", ep["epoch"].tolist(), ep["clean_acc"].tolist()),
         ("robust", ep["epoch"].tolist(), ep["robust_acc"].tolist())], percent=True, marker=best)
    return {"run": run, "log": log.to_dict("records"), "chart": chart, "checkpoints": checkpoints}


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
    notes += [f"{key} {_num(value) if isinstance(value, (int, float)) else value}"
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


# ----------------------------------------------------------------------------- formatting

def _pct(x) -> str:
    return DASH if pd.isna(x) else f"{100 * x:.1f}"


def _int(x) -> str:
    return DASH if pd.isna(x) else str(int(x))


def _num(x) -> str:
    return DASH if pd.isna(x) else f"{x:.4g}"


def _time(t) -> str:
    return DASH if pd.isna(t) else f"{t:%Y-%m-%d %H:%M:%S} UTC"


def _threat(norm, eps) -> str:
    return DASH if pd.isna(norm) else f"{norm} ε = {format_eps(eps)}"


def _split_threat(key: str) -> tuple[str, float]:
    """(norm, eps) of a `ThreatModel.key`."""
    norm, _, eps = key.partition(":")
    return norm, float(eps)


def _duration(s) -> str:
    if pd.isna(s) or s <= 0:
        return DASH
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def _passes(fwd, bwd) -> str:
    return DASH if pd.isna(fwd) and pd.isna(bwd) else f"{_num(fwd)} / {_num(bwd)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def _run_href(run_id: str) -> str:
    return f"runs/{_slug(run_id)}.html"
