"""The HTML report: escaping on every page, ranking by the per-sample worst case, relative links,
flags that link to their evidence, the cost plot, the adaptive worst case, claims next to
measurements, and the comparison of two checkpoints (statistics and adversarial images)."""

import base64
import json
import os
import re
import struct
import zlib
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import browser
import numpy as np
import pytest

from bench.app.claims import Claim, load_claims, seed_claims
from bench.app.plots import pareto_front
from bench.app.report import render_comparison, render_report
from bench.core.errors import BenchError
from bench.core.stats import mcnemar_exact, paired_difference
from bench.core.threat import threat_key
from bench.store import Store
from bench.store.schema import (AdversarialExample, Checkpoint, Evaluation, RemedyOutcome, Run, RunCheckpoint,
                                SampleResult, SanityCheck, TrainEpoch)

XSS = "<script>alert(1)</script>"
EPS = 8 / 255


def _evaluation(checkpoint_id, label, attack, correct, indices=range(10), norm="Linf", eps=EPS, role="attack",
                examples=()):
    indices, correct = list(indices), set(correct)
    n_correct = sum(i in correct for i in indices)
    return Evaluation(
        checkpoint_id=checkpoint_id, label=label, attack=attack, norm=norm, eps=eps,
        threat=None if norm is None else threat_key(norm, eps), config_hash=label,
        indices_hash=f"idx{len(indices)}", dataset="digits", n_samples=len(indices), n_correct=n_correct,
        robust_acc=n_correct / len(indices), forward_passes=100, backward_passes=90, seconds=1.5,
        implementation="atbench", role=role, samples=[SampleResult(sample_index=i, correct=i in correct) for i in indices],
        examples=[_example(i, predicted) for i, predicted in examples])


def _example(index, predicted, shape=(1, 8, 8)):
    """Sample `index`'s image: a ramp, and the same moved by +EPS where the pixel index is even."""
    clean = np.linspace(0.1, 0.9, int(np.prod(shape)), dtype=np.float32)
    adversarial = clean + EPS * (np.arange(clean.size) % 2 == 0)
    return AdversarialExample(sample_index=index, label=index % 10, predicted=predicted, channels=shape[0],
                              height=shape[1], width=shape[2], clean=clean.astype(np.float16).tobytes(),
                              adversarial=adversarial.astype(np.float16).tobytes())


def _run(run_id, label, defense, forward=33.0, backward=30.0):
    return Run(run_id=run_id, label=label, defense=defense, dataset="digits", model="tiny_cnn", norm="Linf",
               eps=EPS, epochs=3, epochs_done=3, status="completed", best_epoch=2, train_seconds=95.0,
               forward_per_sample=forward, backward_per_sample=backward, config={"defense": defense, "lr": 0.1},
               git_commit="abc123", versions={"torch": "2.13.0"}, device="cpu", seed=0)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A (XSS label): clean 100, pgd 70, fgsm 70, but pgd and fgsm miss different samples, so the
    worst case is 40 (samples 3–6); an adaptive attack leaves 3 and 4: adaptive worst case 20.
    B: pgd 50, fgsm 60, worst 50 (samples 0–4; rank 1), at a third of A's training cost. C,
    external: pgd on 5 samples only, worst 40 on n=5; it ties A and ranks below it on clean
    accuracy; a RobustBench model info in the claims folder is named after it. Stored adversarial
    examples: B's pgd on samples 5, 6 and 9, A's fgsm on samples 0, 1, 2."""
    tmp = tmp_path_factory.mktemp("report")
    store = Store(str(tmp / "r.db"))
    a, b, c = 1, 2, 3
    with store.session() as s:
        s.add_all([_run("run-a", XSS, "pgd_at"), _run("run-b", "trades-run", "trades", forward=11.0, backward=10.0)])
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
                   _evaluation(a, "fgsm", "fgsm", range(3, 10), examples=[(0, 7), (1, 7), (2, 7)]),
                   _evaluation(a, "adaptive-pgd", "pgd", [0, 1, 2, 3, 4, 7, 8, 9], role="adaptive"),
                   _evaluation(b, "clean", "clean", range(9), norm=None, eps=None),
                   _evaluation(b, "pgd100", "pgd", range(5), examples=[(5, 3), (6, 3), (9, 3)]),
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
        s.add(RemedyOutcome(checkpoint_id=a, **linf, check="zero_gradients", check_status="fail", status="closed",
                            closed_by="bpda_surrogate", worst_case=0.2, n_samples=10, recheck_status="pass",
                            remedies=[{"remedy": "logit_recovery", "title": "logit recovery", "applies": False,
                                       "why": "the model returns logits"},
                                      {"remedy": "bpda_surrogate", "title": "BPDA <surrogate>", "applies": True,
                                       "worst_case": 0.2, "n": 10, "recheck": "pass"}]))
    claims = tmp / "claims" / "model_info" / "digits" / "Linf"
    claims.mkdir(parents=True)
    (claims / "ext_model.json").write_text(json.dumps({
        "link": "https://example.org/paper", "name": XSS, "authors": "A. Author", "additional_data": False,
        "number_forward_passes": 1, "dataset": "digits", "venue": "Venue 2024", "architecture": "tiny <b>CNN</b>",
        "eps": "8/255", "clean_acc": "95.00", "reported": "50.00", "autoattack_acc": "45.00", "footnote": None}))
    out = tmp / "reports"
    index = render_report(store, out, claims_dir=tmp / "claims")
    return index, out, store


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
    return [{k: v.removesuffix("⇄").strip() for k, v in zip(header, row)} for row in rows]


def _png_size(uri):
    """(width, height, colour type) of a PNG data URI, after checking its chunks' CRCs and that its
    pixels inflate."""
    data = base64.b64decode(uri.removeprefix("data:image/png;base64,"))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body, crc = data[pos + 8:pos + 8 + length], struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc
        chunks[kind] = body
        pos += 12 + length
    width, height, _, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + width * (1 if colour == 0 else 3))
    return width, height, colour


def test_index_and_run_pages_exist(report):
    index, out, _ = report
    assert index == out / "index.html" and index.is_file()
    assert (out / "style.css").is_file() and (out / "claims.html").is_file()
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["run-a.html", "run-b.html"]
    # each row compares with the leader (B); the leader with the runner-up (A ties C on worst case)
    assert sorted(p.name for p in (out / "compare").iterdir()) == [
        "digits-Linf-0.0313725--2-vs-1.html", "digits-Linf-0.0313725--2-vs-3.html"]


def test_user_text_is_escaped_on_every_page(report):
    _, out, _ = report
    pages = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*.html")}
    assert {"index.html", "claims.html", "runs/run-a.html", "runs/run-b.html"} < set(pages)
    assert any(name.startswith("compare/") for name in pages)
    for name, page in pages.items():
        assert "<script>alert" not in page and "<img src=x" not in page and "<b>CNN</b>" not in page, name
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for name in ("index.html", "claims.html", "runs/run-a.html", "compare/digits-Linf-0.0313725--2-vs-1.html"):
        assert escaped in pages[name], name
    assert len(re.findall(r"<script>", pages["index.html"])) == 1       # the page's own sorting script only
    assert not any("<script" in page for name, page in pages.items() if name != "index.html")


def test_rank_by_worst_case_not_min_of_attacks(report):
    rows = _board(report[0])
    assert [(r["#"], r["Defense"]) for r in rows] == [("1", "trades-run"), ("2", XSS), ("3", "ext_model.pt")]
    b, a, c = rows
    assert (a["Clean"], a["pgd100"], a["fgsm"], a["Worst case"]) == ("100.0", "70.0", "70.0", "40.0")
    assert (b["Clean"], b["pgd100"], b["fgsm"], b["Worst case"]) == ("90.0", "50.0", "60.0", "50.0")
    assert (c["pgd100"], c["fgsm"], c["Worst case"]) == ("40.0 n=5", "—", "40.0 n=5")
    assert b["Checkpoint"] == "best, last"                        # same file: one row
    assert (c["Architecture"], c["Train time"], c["Sanity flags"], c["Cost"]) == ("—", "—", "—", "—")
    assert (a["Train time"], a["Cost"], b["Cost"]) == ("1.6 min", "63", "21")  # forward + backward per sample
    assert re.search(r"<h2>digits · Linf ε = 8/255 <span[^>]*>n = 10</span></h2>", report[0].read_text())


def test_rows_carry_what_sorting_and_filtering_read(report):
    html = report[0].read_text()
    rows = re.findall(r'<tr data-views="([^"]*)" data-flagged="(\d)" data-rank-best="([^"]*)" data-rank-last="([^"]*)" '
                      r'data-rank-all="([^"]*)">', html)
    # B is best and last; A only best (ranked 2nd there, unranked among last checkpoints); C is external
    assert rows == [("best last", "0", "1", "1", "1"), ("best", "1", "2", "—", "2"), ("best last", "0", "3", "2", "3")]
    worst = re.findall(r'<td class="num worst" data-value="([^"]*)">', html)
    assert worst[:2] == ["0.5", ""] or worst[0] == "0.5"               # sort keys are the unformatted fractions
    assert 'data-value="0.4"' in html and 'data-value="63"' in html


def test_adaptive_worst_case_is_shown_when_present(report):
    rows = _board(report[0])
    assert [r["Adaptive worst case"] for r in rows] == ["—", "20.0", "—"]  # per-sample AND with the adaptive attack
    run_a = (report[1] / "runs" / "run-a.html").read_text()
    assert "adaptive worst case" in run_a and '<span class="tag">adaptive</span>' in run_a
    assert "<rect class=\"adaptive\"" in report[0].read_text()


def test_each_flag_says_what_its_remedy_did(report):
    """A's failed check was closed by a remedy: its flag says which, and the worst case after it
    (escaped), on the leaderboard and in the check's section of the run page; the warned check,
    which no remedy was run for, says nothing more."""
    html = report[0].read_text()
    assert re.search(r'<a class="flag fail" [^>]*>zero_gradients: BPDA &lt;surrogate&gt; → 20.0% \(closed\)</a>', html)
    assert re.search(r'<a class="flag warn"[^>]*>noise_vs_gradient</a>', html)
    run_a = (report[1] / "runs" / "run-a.html").read_text()
    assert "<b>Adaptive:</b> BPDA &lt;surrogate&gt; → 20.0% (closed)" in run_a


def test_sanity_failures_are_flags_linking_to_their_evidence(report):
    html = report[0].read_text()
    fail = re.search(r'<a class="flag fail" href="(runs/run-a.html#([^"]+))" title="([^"]*)">zero_gradients[:<]', html)
    assert fail and unescape(fail.group(3)).startswith("FAIL zero_gradients: ")
    assert "&lt;b&gt;bold&lt;/b&gt; claim" in fail.group(3)      # the check's summary, escaped
    run_a = (report[1] / "runs" / "run-a.html").read_text()
    assert f'<section class="check fail" id="{fail.group(2)}">' in run_a
    assert re.search(r'<a class="flag warn"[^>]*>noise_vs_gradient</a>', html)
    assert "iterative_vs_single" not in html
    assert _board(report[0])[1]["Sanity flags"] == "zero_gradients: BPDA <surrogate> → 20.0% (closed) noise_vs_gradient"
    # B's failed check is for another threat model (L2 0.5): no flag on its Linf row
    assert _board(report[0])[0]["Defense"].startswith("trades-run") and _board(report[0])[0]["Sanity flags"] == "—"
    assert "<b>bold</b>" not in html


def test_links_are_relative_and_resolve(report):
    _, out, _ = report
    for page in out.rglob("*.html"):
        for link in re.findall(r'(?:src|href)="([^"]*)"', page.read_text()):
            if link.startswith("data:image/png;base64,"):
                continue                                          # inline images
            assert not re.match(r"[a-z]+:", link), f"{page.name}: non-relative link {link}"
            target, _, fragment = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            assert path.is_file(), f"{page.name}: broken {link}"
            assert not fragment or f'id="{fragment}"' in path.read_text(), f"{page.name}: no anchor {link}"
    assert not any(re.search(r"https?://", p.read_text()) for p in out.rglob("*") if p.is_file())
    assert 'href="runs/run-a.html"' in (out / "index.html").read_text()


def test_run_page_contents(report):
    html = (report[1] / "runs" / "run-a.html").read_text()
    tables = _Tables(html).tables
    log = tables[1]
    assert log[0][:4] == ["Epoch", "Loss", "Clean val %", "Robust val %"] and len(log) == 4
    assert log[3][:4] == ["3", "0.6667", "80.0", "50.0"]
    attacks = tables[2]
    assert attacks[0][:9] == ["Label", "Attack", "Threat model", "Accuracy %", "n", "Forward / sample",
                              "Backward / sample", "Seconds", "ms / sample"]
    assert attacks[1][:9] == ["clean", "clean", "—", "100.0", "10", "10", "9", "1.5", "150"]
    assert attacks[-2][:5] == ["worst case", "per-sample AND", "Linf ε = 8/255", "40.0", "10"]
    assert attacks[-1][:5] == ["adaptive worst case", "per-sample AND, adaptive attacks too", "Linf ε = 8/255", "20.0",
                               "10"]
    assert html.count("<polyline") >= 3 and '"lr": 0.1' in unescape(html) and "abc123" in html
    assert "fail" in [row[1] for row in tables[3]]


def test_check_evidence_is_written_for_people(tmp_path):
    """The interval, sample indices as ranges, the check's own first sentence and the status' meaning."""
    store = Store(str(tmp_path / "e.db"))
    with store.session() as s:
        s.add(_run("run-e", "evidence", "pgd_at"))
        s.flush()
        s.add(Checkpoint(checkpoint_id=1, run_id="run-e", path="ck/e.pt", sha256="e" * 64, epoch=1))
        s.flush()
        s.add_all([RunCheckpoint(run_id="run-e", kind="best", checkpoint_id=1),
                   _evaluation(1, "pgd", "pgd", range(5)),
                   SanityCheck(checkpoint_id=1, norm="Linf", eps=EPS, threat=threat_key("Linf", EPS),
                               name="iterative_beats_single_step", status="fail", value=0.2, threshold=0.02,
                               summary="PGD is weaker than FGSM",
                               evidence={"a": "pgd", "b": "fgsm", "n": 200, "ci": [0.1, 0.3],
                                         "broken_only_by_b": 40, "examples": [3, 4, 5, 6, 9, 11, 12]})])
    render_report(store, tmp_path / "out")
    html = (tmp_path / "out" / "runs" / "run-e.html").read_text()
    section = html[html.index('<section class="check fail"'):]
    section = " ".join(section[:section.index("</section>")].split())
    assert "Failed: this expectation of a truly robust model does not hold" in section
    assert "It checks: Iterative attacks are at least as strong as single-step ones, per sample" in section
    assert "<dt>95% interval</dt><dd>[0.1, 0.3]</dd>" in section
    assert "<dt>examples (sample indices)</dt><dd>3–6, 9, 11, 12</dd>" in section
    assert "<dt>broken only by b</dt><dd>40</dd>" in section and "PGD is weaker than FGSM" in section


def test_cost_plot_draws_every_best_checkpoint_and_the_pareto_front(report):
    html = report[0].read_text()
    plot = html[html.index('<svg class="plot"'):html.index("</svg>", html.index('<svg class="plot"'))]
    links = re.findall(r'<a href="([^"]+)"><g class="point">', plot)
    assert links == ["runs/run-b.html", "runs/run-a.html"]      # C has no training cost: not drawn
    front = re.search(r'<polyline class="front" points="([^"]*)"/>', plot).group(1).split()
    b_point = re.search(r'<circle cx="([^"]+)" cy="([^"]+)" r="4"/>\s*<text class="name"[^>]*>trades-run', plot)
    right_edge = re.search(r'<line class="grid" x1="52" x2="([^"]+)"', plot).group(1)
    # B is cheaper and more robust than A: the front is B's point, drawn on to the right edge
    assert front == [f"{b_point.group(1)},{b_point.group(2)}", f"{float(right_edge):.1f},{b_point.group(2)}"]
    assert "log scale" in plot and "worst-case accuracy" in plot
    assert pareto_front([(1, 0.5), (2, 0.4), (3, 0.6), (3, 0.7), (0.5, 0.5), (4, 0.7)]) == [4, 3]


def test_compare_page_statistics(report):
    page = report[1] / "compare" / "digits-Linf-0.0313725--2-vs-1.html"       # A = trades-run (B above), B = XSS run
    tables = _Tables(page.read_text()).tables
    paired = {row[0]: row[1:] for row in tables[1][1:]}
    assert list(paired) == ["clean", "pgd100", "fgsm", "worst case (per-sample AND)", "adaptive worst case"]
    # pgd100: trades-run keeps 0–4, the other 0–6: discordant 0 and 2
    assert paired["pgd100"][:7] == ["10", "50.0", "70.0", "−20.0", paired["pgd100"][4], "0", "2"]
    assert paired["pgd100"][7] == f"{mcnemar_exact(0, 2):.3g}" == "0.5"
    worst_b = np.array([i < 5 for i in range(10)])
    worst_a = np.array([3 <= i <= 6 for i in range(10)])
    diff, lower, upper = paired_difference(worst_b, worst_a)
    assert paired["worst case (per-sample AND)"][:7] == [
        "10", "50.0", "40.0", "+10.0", f"[{100 * lower:+.1f}, {100 * upper:+.1f}]".replace("-", "−"), "3", "2"]
    assert paired["adaptive worst case"][1:3] == ["50.0", "20.0"]
    html = " ".join(page.read_text().split())
    assert "Samples A keeps and B loses <span class=\"muted\">3</span></h2> <p class=\"samples\">0–2</p>" in html
    assert "Samples B keeps and A loses <span class=\"muted\">2</span></h2> <p class=\"samples\">5, 6</p>" in html


def test_compare_page_shows_the_losers_adversarial_images(report):
    html = (report[1] / "compare" / "digits-Linf-0.0313725--2-vs-1.html").read_text()
    captions = [" ".join(c.split()) for c in re.findall(r"<figcaption>(.*?)</figcaption>", html, re.S)]
    assert [re.sub(r"<[^>]+>", "", c) for c in captions] == [
        f"sample {i}: label {i}, {unescape(XSS)} under fgsm says 7 (max change 0.0314)".replace("<", "&lt;").replace(">", "&gt;")
        for i in (0, 1, 2)] + [f"sample {i}: label {i}, trades-run under pgd100 says 3 (max change 0.0314)" for i in (5, 6)]
    uris = re.findall(r'<img src="(data:image/png;base64,[^"]+)"', html)
    assert len(uris) == 15 and all(_png_size(u) == (8, 8, 0) for u in uris)     # clean, adversarial, perturbation
    perturbation = base64.b64decode(uris[2].split(",")[1])
    assert perturbation != base64.b64decode(uris[0].split(",")[1])


def test_render_comparison_by_run_name(report):
    _, out, store = report
    page = render_comparison(store, out, "trades-run", "run-a")
    assert page == out / "compare" / "digits-Linf-0.0313725--2-vs-1.html" and page.is_file()
    with pytest.raises(BenchError, match="names no runs"):
        render_comparison(store, out, "nope", "run-a")
    with pytest.raises(BenchError, match="has no 'last' checkpoint"):
        render_comparison(store, out, "run-b", "run-a:last")
    with pytest.raises(BenchError, match="same checkpoint"):
        render_comparison(store, out, "run-b", "run-b:last")


def test_claims_are_shown_next_to_measurements(report):
    rows = _board(report[0])
    assert [r["Claimed"] for r in rows] == ["—", "—", "95.00 → 80.0 (−15.0)"]  # C: a RobustBench model info
    html = report[0].read_text()
    table = _Tables(html).tables[1]
    assert table[0] == ["Row", "Claim", "Source", "Metric", "Claimed", "Measured", "Difference", "Measured by"]
    assert [row[-5:] for row in table[1:]] == [["Clean", "95.00", "80.0", "−15.0", "clean"],
                                              ["PGD-20", "—", "—", "—", ""], ["AutoAttack", "45.00", "—", "—", ""]]
    claims = _Tables((report[1] / "claims.html").read_text()).tables[0]
    assert len(claims) - 1 == len(seed_claims()) + 1
    rb = next(row for row in claims if row[0] == "ext_model")
    assert rb[2:] == ["digits", "tiny <b>CNN</b>", "Linf ε = 8/255", "95.00", "not reported", "45.00", "—", "—",
                      "ext_model.pt external"]


def test_seed_claims_match_runs_of_the_same_setting():
    psat = next(c for c in seed_claims() if c.method == "P-SAT" and c.model and c.dataset == "cifar10")
    config = {"defense": "p_sat", "model": "wrn", "model_params": {"depth": 34, "width": 10, "head": "linear"},
              "defense_params": {"steps": 10}}
    assert (psat.clean, psat.pgd20, psat.autoattack, psat.table) == (86.84, None, 50.75, "Table 1")
    assert psat.matches("cifar10", "Linf", 8 / 255, config, ())
    assert not psat.matches("cifar10", "Linf", 8 / 255, {**config, "model_params": {"depth": 28, "width": 10}}, ())
    assert not psat.matches("cifar10", "Linf", 16 / 255, config, ())
    assert not psat.matches("cifar10", "Linf", 8 / 255, {**config, "defense": "h_sat"}, ())
    one_step = next(c for c in seed_claims() if c.method == "one-step ATLAS" and c.dataset == "cifar10")
    atlas = {"defense": "atlas", "model": "wrn", "model_params": {"depth": 28, "width": 8}}
    assert one_step.matches("cifar10", "Linf", 8 / 255, {**atlas, "defense_params": {"steps": 1}}, ())
    assert not one_step.matches("cifar10", "Linf", 8 / 255, {**atlas, "defense_params": {"steps": 10}}, ())
    unmatched = Claim(paper="p", method="m", dataset="cifar10", architecture="ResNet-50", norm="Linf", eps=8 / 255,
                      defense="tat_dra")
    assert not unmatched.matches("cifar10", "Linf", 8 / 255, {"defense": "tat_dra", "model": "resnet50"}, ())


def test_seed_claims_are_the_papers_numbers():
    """Every number of a seed claim appears in its paper's text in shared/papers (when it is there),
    with its table; page numbers only from the thesis, whose list of tables gives them."""
    papers = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "papers",
                               Path("/work/shared/papers")) if p.is_dir()), None)
    claims = seed_claims()
    assert {c.defense for c in claims} >= {"tgcl", "h_sat", "p_sat", "sat_r1", "sat_r2", "sat_r3", "spat", "tat_dra",
                                           "atlas"}
    if papers is None:
        pytest.skip("the papers' texts (shared/papers) are not beside this checkout")
    for claim in claims:
        text = (papers / claim.source).read_text()
        assert claim.table.split(" and ")[0].removeprefix("Tables ").removeprefix("Table ") in text
        for value in (claim.clean, claim.pgd20, claim.autoattack):
            if value is not None:
                assert re.search(rf"(?<![\d.]){value:.2f}(?!\d)|(?<![\d.]){value:.1f}%", text), (claim.method, value)
        assert claim.page is None or "thesis" in claim.paper


def test_robustbench_claims_need_their_threat_model_folder(tmp_path):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "Model.json").write_text(json.dumps({"dataset": "cifar10", "eps": "8/255", "clean_acc": "90"}))
    with pytest.raises(BenchError, match="folder named Linf or L2"):
        load_claims(tmp_path)


def test_empty_store(tmp_path):
    index = render_report(Store(str(tmp_path / "e.db")), tmp_path / "out")
    assert "No evaluations yet." in index.read_text() and "No runs yet." in index.read_text()


# --------------------------------------------------------------------------- in a real browser

ARTIFACTS = Path(os.environ.get("ATBENCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
needs_chromium = pytest.mark.skipif(browser.chromium() is None, reason="chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    chrome = browser.Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield chrome
    chrome.close()


def _defenses(page):
    """The names in the first leaderboard's Defense column, top to bottom, of the rows shown."""
    return page.js("Array.from(document.querySelectorAll('table.board tbody tr')).filter(r => !r.hidden)"
                   ".map(r => r.cells[1].querySelector('a, span') ? r.cells[1].firstChild.textContent.trim() "
                   ": r.cells[1].textContent.trim()).map(t => t.replace(/\\s*⇄$/, ''))")


def _click(page, header):
    page.js(f"Array.from(document.querySelectorAll('table.board thead th')).find(th => th.textContent.trim() === "
            f"{json.dumps(header)}).querySelector('button').click()")


def _filter(page, text):
    page.js(f"(() => {{ const box = document.querySelector('input.filter'); box.value = {json.dumps(text)}; "
            f"box.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")


@needs_chromium
def test_every_page_loads_without_errors_and_every_link_resolves(report, page):
    """Each page in Chromium: no console error, no failed load, no dialog (the XSS labels stay
    text), every link to a file that exists and, with a fragment, to an element that exists there;
    every inline image decodes. A screenshot of each page is kept."""
    _, out, _ = report
    pages = sorted(out.rglob("*.html"))
    assert len(pages) == 6
    for path in pages:
        page.open(path)
        name = path.relative_to(out).as_posix()
        assert page.errors == [], (name, page.errors)
        scripts = page.js("document.scripts.length")
        assert scripts == (1 if name == "index.html" else 0), name
        links = page.js("Array.from(document.querySelectorAll('a[href], link[href]'))"
                        ".map(a => new URL(a.getAttribute('href'), document.baseURI).href)")
        assert links, name
        for link in links:
            assert link.startswith("file://"), (name, link)
            target, _, fragment = unquote(link.removeprefix("file://")).partition("#")
            assert Path(target).is_file(), (name, link)
            assert not fragment or f'id="{fragment}"' in Path(target).read_text(), (name, link)
        images = page.js("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)])")
        assert all(done and width > 0 and src == "data:image/png;base64," for done, width, src in images), name
        if name == "compare/digits-Linf-0.0313725--2-vs-1.html":
            assert len(images) == 15
        page.screenshot(ARTIFACTS / "browser" / (name.replace("/", "__").removesuffix(".html") + ".png"))
    assert page.errors == []


@needs_chromium
def test_sorting_filtering_and_views_in_the_browser(report, page):
    page.open(report[0])
    xss = unescape(XSS)
    assert _defenses(page) == ["trades-run", xss, "ext_model.pt"]        # best checkpoints (and external), by rank
    _click(page, "Clean")
    assert _defenses(page) == [xss, "trades-run", "ext_model.pt"]        # 100, 90, 80: highest first
    _click(page, "Clean")
    assert _defenses(page) == ["ext_model.pt", "trades-run", xss]
    _click(page, "Cost")
    assert _defenses(page) == ["trades-run", xss, "ext_model.pt"]        # 21, 63, then unknown last
    _click(page, "Defense")
    assert _defenses(page) == sorted([xss, "trades-run", "ext_model.pt"], key=str.lower)
    assert page.js("document.querySelector('th[aria-sort]').textContent.trim()") == "Defense"
    page.screenshot(ARTIFACTS / "browser" / "index__sorted-by-defense.png")

    page.js("document.querySelector('input[value=last]').click()")
    assert sorted(_defenses(page)) == ["ext_model.pt", "trades-run"]     # A's last checkpoint was not evaluated
    assert page.js("Array.from(document.querySelectorAll('table.board tbody tr')).filter(r => !r.hidden)"
                   ".map(r => r.cells[0].textContent)").count("1") == 1
    page.js("document.querySelector('input[value=all]').click()")
    _filter(page, "TRADES")
    assert _defenses(page) == ["trades-run"]
    assert page.js("document.querySelector('.shown').textContent") == "1 of 3 rows"
    _filter(page, "")
    page.js("document.querySelector('input.flagged').click()")
    assert _defenses(page) == [xss]
    page.js("document.querySelector('input.flagged').click()")
    page.js("document.querySelector('input.column').click()")                 # hide the first attack column
    assert page.js("Array.from(document.querySelectorAll('table.board thead th')).filter(th => !th.hidden)"
                   ".map(th => th.textContent.trim())")[4:7] == ["Clean", "fgsm", "Worst case"]
    assert page.errors == []


@needs_chromium
def test_leaderboard_prints_without_its_controls(report, page):
    page.open(report[0])
    page.send("Emulation.setEmulatedMedia", {"media": "print"}, session=True)
    try:
        assert page.js("getComputedStyle(document.querySelector('form.controls')).display") == "none"
        assert page.js("document.querySelector('svg.plot').getBoundingClientRect().width") > 300
        assert page.js("getComputedStyle(document.querySelector('svg.plot text.name')).fill") == "rgb(31, 35, 40)"
        page.screenshot(ARTIFACTS / "browser" / "index__print.png")
    finally:
        page.send("Emulation.setEmulatedMedia", {"media": ""}, session=True)
    assert page.errors == []


def test_measured_pgd20_and_autoattack_are_found_by_their_parameters():
    import pandas as pd

    from bench.app.report import _measured
    from bench.core.attack import ATTACKS

    aa = ATTACKS.get("autoattack")(norm="Linf", eps=0.2).params()
    rows = pd.DataFrame([
        {"attack": "pgd", "label": "pgd100", "robust_acc": 0.5, "config": {"params": {"steps": 100}}},
        {"attack": "pgd", "label": "pgd_cw", "robust_acc": 0.45, "config": {"params": {"steps": 20, "loss": "cw"}}},
        {"attack": "pgd", "label": "pgd20", "robust_acc": 0.55, "config": {"params": {"steps": 20, "loss": "ce"}}},
        {"attack": "autoattack", "label": "aa_cpu", "robust_acc": 0.4,
         "config": {"params": {**aa, "n_target_classes": 3, "square_queries": 500}}}])
    assert _measured(rows) == {"pgd20": (0.55, "pgd20", ""),
                               "autoattack": (0.4, "aa_cpu", "not the paper's budget: n_target_classes=3, "
                                                             "square_queries=500")}
