"""The HTML report: escaping, ranking by the per-sample worst case, relative links, flags."""

import re
import shutil
import subprocess
from html import unescape
from html.parser import HTMLParser

import pytest

from bench.app.report import render_report
from bench.core.threat import threat_key
from bench.store import Store
from bench.store.schema import Checkpoint, Evaluation, Run, RunCheckpoint, SampleResult, SanityCheck, TrainEpoch

XSS = "<script>alert(1)</script>"
EPS = 8 / 255


def _evaluation(checkpoint_id, label, attack, correct, indices=range(10), norm="Linf", eps=EPS):
    indices, correct = list(indices), set(correct)
    n_correct = sum(i in correct for i in indices)
    return Evaluation(
        checkpoint_id=checkpoint_id, label=label, attack=attack, norm=norm, eps=eps,
        threat=None if norm is None else threat_key(norm, eps), config_hash=label,
        indices_hash=f"idx{len(indices)}", dataset="digits", n_samples=len(indices), n_correct=n_correct,
        robust_acc=n_correct / len(indices), forward_passes=100, backward_passes=90, seconds=1.5,
        implementation="atbench", role="attack", samples=[SampleResult(sample_index=i, correct=i in correct) for i in indices])


def _run(run_id, label, defense):
    return Run(run_id=run_id, label=label, defense=defense, dataset="digits", model="tiny_cnn", norm="Linf",
               eps=EPS, epochs=3, epochs_done=3, status="completed", best_epoch=2, train_seconds=95.0,
               forward_per_sample=33.0, backward_per_sample=30.0, config={"defense": defense, "lr": 0.1},
               git_commit="abc123", versions={"torch": "2.13.0"}, device="cpu", seed=0)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A (XSS label): clean 100, pgd 70, fgsm 70, but pgd and fgsm miss different samples, so the
    worst case is 40. B: pgd 50, fgsm 60, worst 50 (rank 1). C, external: pgd on 5 samples only,
    worst 40 on n=5; it ties A and ranks below it on clean accuracy."""
    tmp = tmp_path_factory.mktemp("report")
    store = Store(str(tmp / "r.db"))
    a, b, c = 1, 2, 3
    with store.session() as s:
        s.add_all([_run("run-a", XSS, "pgd_at"), _run("run-b", "trades-run", "trades")])
        s.flush()                                                  # checkpoints have no relationship to runs
        s.add_all([TrainEpoch(run_id="run-a", epoch=e, loss=2.0 / e, clean_acc=0.5 + 0.1 * e, robust_acc=0.2 + 0.1 * e,
                              lr=0.1, seconds=30.0) for e in (1, 2, 3)])
        s.add_all([Checkpoint(checkpoint_id=a, run_id="run-a", path="ck/a.pt", sha256="a" * 64, epoch=2),
                   Checkpoint(checkpoint_id=b, run_id="run-b", path="ck/b_best.pt", sha256="b" * 64, epoch=3),
                   Checkpoint(checkpoint_id=c, run_id=None, path="/models/ext_model.pt", sha256="c" * 64)])
        s.flush()
        s.add_all([RunCheckpoint(run_id="run-a", kind="best", checkpoint_id=a),
                   RunCheckpoint(run_id="run-b", kind="best", checkpoint_id=b),
                   RunCheckpoint(run_id="run-b", kind="last", checkpoint_id=b)])
        s.add_all([_evaluation(a, "clean", "clean", range(10), norm=None, eps=None),
                   _evaluation(a, "pgd100", "pgd", range(0, 7)),
                   _evaluation(a, "fgsm", "fgsm", range(3, 10)),
                   _evaluation(b, "clean", "clean", range(9), norm=None, eps=None),
                   _evaluation(b, "pgd100", "pgd", range(5)),
                   _evaluation(b, "fgsm", "fgsm", range(6)),
                   _evaluation(c, "clean", "clean", range(8), norm=None, eps=None),
                   _evaluation(c, "pgd100", "pgd", [0, 1], indices=range(5))])
        linf, l2 = dict(norm="Linf", eps=EPS, threat=threat_key("Linf", EPS)), dict(norm="L2", eps=0.5, threat="L2:0.5")
        s.add_all([SanityCheck(checkpoint_id=a, **linf, name="zero_gradients", status="fail",
                               value=0.0, threshold=1e-8, summary="<b>bold</b> claim",
                               evidence={"note": "<img src=x onerror=alert(2)>"}),
                   SanityCheck(checkpoint_id=a, **linf, name="noise_vs_gradient", status="warn",
                               value=0.1, threshold=0.05),
                   SanityCheck(checkpoint_id=a, **linf, name="iterative_vs_single", status="pass",
                               value=0.0, threshold=0.0),
                   SanityCheck(checkpoint_id=b, **l2, name="zero_gradients", status="fail",
                               value=0.0, threshold=1e-8)])
    out = tmp / "reports"
    index = render_report(store, out)
    return index, out


class _Tables(HTMLParser):
    """Cell texts of every table: tables[t][row][col]."""

    def __init__(self, html):
        super().__init__()
        self.tables, self.cell = [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _board(index):
    header, *rows = _Tables(index.read_text()).tables[0]
    return [dict(zip(header, row)) for row in rows]


def test_index_and_run_pages_exist(report):
    index, out = report
    assert index == out / "index.html" and index.is_file()
    assert (out / "style.css").is_file()
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["run-a.html", "run-b.html"]


def test_user_text_is_escaped(report):
    _, out = report
    pages = [p.read_text() for p in out.rglob("*.html")]
    assert not any("<script>alert" in p or "<img src=x" in p for p in pages)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in (out / "index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in (out / "runs" / "run-a.html").read_text()


def test_rank_by_worst_case_not_min_of_attacks(report):
    rows = _board(report[0])
    assert [(r["#"], r["Defense"]) for r in rows] == [("1", "trades-run"), ("2", XSS), ("3", "ext_model.pt")]
    b, a, c = rows
    assert (a["Clean"], a["pgd100"], a["fgsm"], a["Worst case"]) == ("100.0", "70.0", "70.0", "40.0")
    assert (b["Clean"], b["pgd100"], b["fgsm"], b["Worst case"]) == ("90.0", "50.0", "60.0", "50.0")
    assert (c["pgd100"], c["fgsm"], c["Worst case"]) == ("40.0 n=5", "—", "40.0 n=5")
    assert b["Checkpoint"] == "best, last"                        # same file: one row
    assert (c["Architecture"], c["Train time"], c["Sanity flags"]) == ("—", "—", "—")
    assert (a["Train time"], a["Passes / sample"]) == ("1.6 min", "33 / 30")
    assert re.search(r"<h2>digits · Linf ε = 8/255 <span[^>]*>n = 10</span></h2>", report[0].read_text())


def test_sanity_failures_are_flags(report):
    html = report[0].read_text()
    assert re.search(r'<span class="flag fail"[^>]*>zero_gradients</span>', html)
    assert re.search(r'<span class="flag warn"[^>]*>noise_vs_gradient</span>', html)
    assert "iterative_vs_single" not in html
    assert _board(report[0])[1]["Sanity flags"] == "zero_gradients noise_vs_gradient"
    # B's failed check is for another threat model (L2 0.5): no flag on its Linf row
    assert _board(report[0])[0]["Defense"].startswith("trades-run") and _board(report[0])[0]["Sanity flags"] == "—"
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt; claim" in html  # summaries are escaped too


def test_links_are_relative_and_resolve(report):
    _, out = report
    for page in out.rglob("*.html"):
        for link in re.findall(r'(?:src|href)="([^"]*)"', page.read_text()):
            assert not re.match(r"[a-z]+:", link), f"{page.name}: non-relative link {link}"
            target = link.split("#")[0]
            assert not target or (page.parent / target).resolve().is_file(), f"{page.name}: broken {link}"
    assert not any(re.search(r"https?://", p.read_text()) for p in out.rglob("*") if p.is_file())
    assert 'href="runs/run-a.html"' in (out / "index.html").read_text()


def test_run_page_contents(report):
    html = (report[1] / "runs" / "run-a.html").read_text()
    tables = _Tables(html).tables
    log = tables[1]
    assert log[0][:4] == ["Epoch", "Loss", "Clean val %", "Robust val %"] and len(log) == 4
    assert log[3][:4] == ["3", "0.6667", "80.0", "50.0"]
    attacks = tables[2]
    assert attacks[1][:5] == ["clean", "clean", "—", "100.0", "10"]
    assert attacks[-1][:5] == ["worst case", "per-sample AND", "Linf ε = 8/255", "40.0", "10"]
    assert "<polyline" in html and '"lr": 0.1' in unescape(html) and "abc123" in html
    assert "fail" in [row[1] for row in tables[3]]


def test_empty_store(tmp_path):
    index = render_report(Store(str(tmp_path / "e.db")), tmp_path / "out")
    assert "No evaluations yet." in index.read_text() and "No runs yet." in index.read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_opens_in_headless_browser(report, tmp_path):
    index = report[0]
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
         "--dump-dom", index.resolve().as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Leaderboards" in dom and "trades-run" in dom and "Worst case" in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script>alert" not in dom
