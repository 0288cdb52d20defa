"""Static HTML report: one leaderboard per (dataset, threat model) and one page per run.

Reads the store with pandas, sorts and formats there, and renders the Jinja templates in
`bench/templates` (autoescape on) into `out_dir`: `index.html`, `runs/<run_id>.html`,
`style.css`. Static files with relative links only, so the report opens from disk.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import select

from bench.store import Checkpoint, Evaluation, Run, SampleResult, SanityCheck, Store, TrainEpoch
from bench.threat import format_eps

DASH = "—"
STATUS_ORDER = {"fail": 0, "warn": 1, "pass": 2, "not-run": 3}
TM = ["dataset", "norm", "eps"]                   # one leaderboard
ROW = TM + ["checkpoint_sha256"]                  # one leaderboard row


def render_report(store: Store, out_dir: str | Path = "reports") -> Path:
    """Write the report into `out_dir` and return the path of its `index.html`."""
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for stale in (out / "runs").glob("*.html"):
        stale.unlink()
    d = _load(store)
    entries = _entries(d)
    worst = _worst_case(d)
    flags = _flags(d["sanity"])
    env = Environment(loader=PackageLoader("bench", "templates"), autoescape=select_autoescape(["html"]),
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
    def read(*what):
        return pd.read_sql(select(*what), store.engine)

    ev = read(Evaluation.__table__).sort_values(["created_at", "evaluation_id"])
    ev = ev.drop_duplicates(["checkpoint_sha256", "dataset", "label", "norm", "eps"], keep="last")
    clean = ev[ev["norm"].isna()].drop_duplicates(["dataset", "checkpoint_sha256"], keep="last")
    return {
        "runs": read(Run.__table__).sort_values(["dataset", "label", "run_id"]),
        "epochs": read(TrainEpoch.__table__).sort_values(["run_id", "epoch"]),
        "checkpoints": read(Checkpoint.__table__),
        "attacks": ev[ev["norm"].notna()].sort_values("evaluation_id"),
        "clean": clean,
        "samples": read(SampleResult.evaluation_id, SampleResult.sample_index, SampleResult.correct),
        "sanity": read(SanityCheck.__table__),
    }


def _entries(d: dict) -> pd.DataFrame:
    """One entry per checkpoint file (sha256); kinds sharing a file (best = last) are merged."""
    ck = d["checkpoints"].sort_values(["run_id", "kind"], na_position="last")
    ck = ck.groupby("sha256", sort=False).agg(
        run_id=("run_id", "first"), epoch=("epoch", "first"), path=("path", "first"),
        kind=("kind", lambda k: ", ".join(dict.fromkeys(k))))
    runs = d["runs"][["run_id", "label", "model", "status", "train_seconds", "forward_per_sample",
                      "backward_per_sample"]]
    e = ck.reset_index().merge(runs, on="run_id", how="left").set_index("sha256")
    e["name"] = e["label"].fillna(e["path"].map(lambda p: Path(p).name))
    e["href"] = e["run_id"].map(_run_href, na_action="ignore")
    return e


def _worst_case(d: dict) -> pd.DataFrame:
    """Per-sample AND over every attack of a threat model and the clean evaluation, over the
    samples that all of them cover. Columns: ROW + worst, n, mixed (sample sets differ)."""
    attacks = d["attacks"]
    clean = attacks[ROW].drop_duplicates().merge(d["clean"][["dataset", "checkpoint_sha256", "evaluation_id",
                                                            "indices_hash"]], on=["dataset", "checkpoint_sha256"])
    members = pd.concat([attacks[ROW + ["evaluation_id", "indices_hash"]], clean])
    grouped = members.groupby(ROW)
    members["k"] = grouped["evaluation_id"].transform("size")
    s = members.merge(d["samples"], on="evaluation_id")
    per = s.groupby(ROW + ["sample_index"]).agg(hits=("correct", "size"), ok=("correct", "all"), k=("k", "first"))
    per = per[per["hits"] == per["k"]]
    worst = per.groupby(ROW)["ok"].agg(worst="mean", n="size")
    mixed = grouped["indices_hash"].nunique().gt(1).rename("mixed")
    return worst.join(mixed, how="right").reset_index()


def _flags(sanity: pd.DataFrame) -> dict[str, list[dict]]:
    """Failed and warned sanity checks per checkpoint sha256, failures first."""
    bad = sanity[sanity["status"].isin(["fail", "warn"])]
    bad = bad.assign(order=bad["status"].map(STATUS_ORDER),
                     title=[f"{s}: value {_num(v)}, threshold {_num(t)}"
                            for s, v, t in zip(bad["status"], bad["value"], bad["threshold"])])
    bad = bad.sort_values(["order", "name"])
    return {sha: g[["name", "status", "title"]].to_dict("records") for sha, g in bad.groupby("checkpoint_sha256")}


# ----------------------------------------------------------------------------- leaderboards

def _board(key: tuple, grp: pd.DataFrame, d: dict, entries: pd.DataFrame, worst: pd.DataFrame,
           flags: dict) -> dict:
    dataset, norm, eps = key
    labels = list(grp["label"].unique())                       # suite order (evaluation id)
    n_table = int(grp["n_samples"].mode().max())
    acc = grp.pivot(index="checkpoint_sha256", columns="label", values="robust_acc")[labels]
    n = grp.pivot(index="checkpoint_sha256", columns="label", values="n_samples")[labels]
    clean = d["clean"][d["clean"]["dataset"] == dataset].set_index("checkpoint_sha256")
    w = worst[(worst["dataset"] == dataset) & (worst["norm"] == norm) & (worst["eps"] == eps)]
    df = pd.DataFrame(index=acc.index).join(entries).join(clean[["robust_acc", "n_samples"]])
    df = df.join(w.set_index("checkpoint_sha256")[["worst", "n", "mixed"]])
    df["name"] = df["name"].fillna(pd.Series(df.index.str[:12], index=df.index))
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
    df["flags"] = [flags.get(sha, []) for sha in df.index]
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
    for sha, e in entries[entries["run_id"] == run["run_id"]].iterrows():
        ev = evs[evs["checkpoint_sha256"] == sha].sort_values("evaluation_id")
        w = worst[worst["checkpoint_sha256"] == sha]
        san = d["sanity"][d["sanity"]["checkpoint_sha256"] == sha].copy()
        san = san.assign(order=san["status"].map(STATUS_ORDER)).sort_values(["order", "name"])
        checkpoints.append({
            "kind": e["kind"], "epoch": _int(e["epoch"]), "sha": sha, "path": e["path"],
            "evaluations": [{"label": r.label, "attack": r.attack, "threat": _threat(r.norm, r.eps),
                             "acc": _pct(r.robust_acc), "n": r.n_samples, "fwd": r.forward_passes,
                             "bwd": r.backward_passes, "seconds": f"{r.seconds:.1f}",
                             "impl": r.implementation} for r in ev.itertuples()],
            "worst": [{"threat": _threat(r.norm, r.eps), "acc": _pct(r.worst), "n": _int(r.n)}
                      for r in w.itertuples()],
            "sanity": [{"name": r.name, "status": r.status, "value": _num(r.value), "threshold": _num(r.threshold),
                        "evidence": json.dumps(r.evidence, sort_keys=True, default=str) if r.evidence else DASH}
                       for r in san.itertuples()]})
    return {"run": run, "log": log.to_dict("records"), "chart": _chart(ep, run["best_epoch"]),
            "checkpoints": checkpoints}


def _chart(ep: pd.DataFrame, best_epoch: str, w: int = 560, h: int = 220) -> dict | None:
    """Coordinates for an inline SVG of clean/robust validation accuracy per epoch."""
    if ep.empty:
        return None
    left, right, top, bottom = 44, 12, 12, 30
    e0, e1 = ep["epoch"].min(), ep["epoch"].max()
    x = lambda e: left + (e - e0) / max(e1 - e0, 1) * (w - left - right)   # noqa: E731
    y = lambda a: top + (1 - a) * (h - top - bottom)                         # noqa: E731
    line = lambda col: " ".join(f"{x(e):.1f},{y(a):.1f}" for e, a in zip(ep["epoch"], ep[col]))  # noqa: E731
    xticks = np.unique(np.linspace(e0, e1, min(6, len(ep))).round().astype(int))
    best = int(best_epoch) if best_epoch != DASH and e0 <= int(best_epoch) <= e1 else None
    return {"w": w, "h": h, "left": left, "right": w - right, "top": top, "bottom": h - bottom,
            "clean": line("clean_acc"), "robust": line("robust_acc"),
            "yticks": [(f"{y(v / 100):.1f}", v) for v in (0, 25, 50, 75, 100)],
            "xticks": [(f"{x(e):.1f}", int(e)) for e in xticks],
            "best": None if best is None else f"{x(best):.1f}"}


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
