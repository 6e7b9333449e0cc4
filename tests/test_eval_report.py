"""pipelines/eval_report.py on made-up results: report.json's shape, best.json's choice, report.html's
structure (browser-free: a real screenshot is in tests/test_evaluate.py), the text summary."""

from __future__ import annotations

import html.parser
import io
import json
import re

from pipelines.eval_report import (
    build_report,
    line_chart,
    report_html,
    select_best,
    summarize_report,
    write_report,
)
from schemas.layout import BEST_FILE, EVAL_HTML_FILE, EVAL_REPORT_FILE

METRIC_NAMES = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
SUMMARY = {
    "run_root": "runs/x",
    "eval_dir": "runs/x/eval",
    "model": {"encoder": "mobilenet_v3_small"},
    "eval": {"beam_size": 3, "max_caption_length": 20, "length_normalization": 0.0},
}


def result(phase, step, kind="intermediate", cider=1.0, status="ok", images=(1, 2, 3, 4)):
    url = f"runs/x/train/phase{phase}/" + ("final" if kind == "final" else f"checkpoint_{step:09d}")
    global_step = step + (400 if phase == 2 else 0)
    base = {"phase": phase, "step": step, "kind": kind, "url": url, "global_step": global_step, "seconds": 2.5}
    if status != "ok":
        return {**base, "status": "failed", "error": "OSError: Unable to open file (truncated file)"}
    metrics = {name: cider / 4 for name in METRIC_NAMES} | {"CIDEr": cider}
    captions = [
        {
            "image_id": i,
            "caption": f"a caption <b>{i}</b> of step {step}",
            "p": 0.01 * i,
            "references": [f"ref {i} one", f"ref {i} two"],
        }
        for i in images
    ]
    blind = {"caption": "a blue square", "p": 0.002, "metrics": {name: 0.1 for name in METRIC_NAMES}}
    perplexity = 5.0 / (1 + step / 100)
    return {**base, "status": "ok", "perplexity": perplexity, "metrics": metrics, "blind": blind, "captions": captions}


def make_report(results):
    return build_report(results, split="test", select_by="CIDEr", summary=SUMMARY, created="2026-01-01T00:00:00+00:00")


def tiny_jpeg(colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, format="JPEG")
    return out.getvalue()


RESULTS = [
    result(2, 200, "final", cider=1.5),
    result(1, 100, cider=0.5),
    result(1, 200, status="failed"),
    result(2, 200, cider=1.5),
    result(1, 400, "final", cider=1.2),
]


def test_report_sorts_checkpoints_counts_failures_and_names_the_best():
    report = make_report(RESULTS)

    order = [(c["phase"], c["step"], c["kind"]) for c in report["checkpoints"]]
    assert order == [
        (1, 100, "intermediate"),
        (1, 200, "intermediate"),
        (1, 400, "final"),
        (2, 200, "intermediate"),
        (2, 200, "final"),
    ]
    assert report["counts"] == {"checkpoints": 5, "ok": 4, "failed": 1}
    assert report["images"] == 4 and report["split"] == "test" and report["created"].startswith("2026")
    assert report["run_root"] == "runs/x" and report["eval"]["beam_size"] == 3
    # A tie on CIDEr goes to the final (config and vocabulary beside its weights).
    assert report["best"] == {
        "select_by": "CIDEr",
        "value": 1.5,
        "checkpoint": {"phase": 2, "step": 200, "kind": "final", "url": "runs/x/train/phase2/final"},
    }


def test_best_by_another_metric_and_none_when_nothing_succeeded():
    results = [result(1, 100, cider=0.5), result(1, 200, cider=0.9)]
    results[0]["metrics"]["METEOR"] = 0.9
    assert select_best(results, "METEOR")["checkpoint"]["step"] == 100
    assert select_best(results, "SPICE") is None  # not computed
    assert select_best([result(1, 100, status="failed")], "CIDEr") is None


def test_write_report_writes_three_files_and_no_best_json_when_all_failed(tmp_path):
    report = make_report(RESULTS)
    write_report(str(tmp_path / "ok"), report, {1: tiny_jpeg()})
    assert json.loads((tmp_path / "ok" / EVAL_REPORT_FILE).read_text()) == report
    assert json.loads((tmp_path / "ok" / BEST_FILE).read_text()) == report["best"]
    assert (tmp_path / "ok" / EVAL_HTML_FILE).read_text().startswith("<!DOCTYPE html>")

    failed = make_report([result(1, 100, status="failed")])
    write_report(str(tmp_path / "failed"), failed, {})
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == [EVAL_HTML_FILE, EVAL_REPORT_FILE]
    assert "no checkpoint could be evaluated" in (tmp_path / "failed" / EVAL_HTML_FILE).read_text()
    assert "no checkpoint could be evaluated" in summarize_report(failed)


class Outline(html.parser.HTMLParser):
    """What a browser would load and show: tags, attributes, table rows, text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[str]] = []
        self.row_classes: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "tr":
            self.rows.append([])
            self.row_classes.append(attrs.get("class", ""))
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def all(self, tag):
        return [attrs for name, attrs in self.tags if name == tag]


def test_html_is_a_self_contained_page_with_table_charts_and_images():
    report = make_report(RESULTS)
    page = report_html(report, {1: tiny_jpeg(), 2: tiny_jpeg((30, 30, 200))})
    outline = Outline()
    outline.feed(page)
    text = "".join(outline.text)

    # Nothing is fetched: no scripts, no stylesheets or frames, every image a data: URI.
    assert not outline.all("script") and not outline.all("link") and not outline.all("iframe")
    for tag, attrs in outline.tags:
        for name in ("src", "href"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(name) or ""), (tag, attrs)
    images = outline.all("img")
    assert len(images) == 2 and all(img["src"].startswith("data:image/jpeg;base64,") for img in images)
    assert outline.all("style")  # inline CSS

    # The metrics table: a header and one row per checkpoint, best highlighted, failure shown.
    header, *rows = outline.rows
    assert header[:5] == ["phase", "step", "kind", "status", "perplexity"] and "CIDEr" in header
    assert len(rows) == 5
    row_classes = outline.row_classes[1:]
    assert row_classes.count("best") == 1 and rows[row_classes.index("best")][:3] == ["2", "200", "final"]
    failed = rows[1]
    assert failed[3] == "failed" and "truncated file" in failed[4]

    # Charts: one per metric and one of perplexity, each with a line per phase.
    charts = outline.all("svg")
    assert len(charts) == len(METRIC_NAMES) + 1
    assert sum(1 for tag, _ in outline.tags if tag == "polyline") >= 2 * len(charts)
    assert "CIDEr vs step" in text and "perplexity vs step" in text

    # Samples: the best checkpoint's caption, the other final's, and the references, escaped.
    assert "a caption <b>1</b> of step 200" in text  # shown as text, not markup
    assert "<b>1</b>" not in page.replace("&lt;b&gt;1&lt;/b&gt;", "")
    assert "phase 1 final" in text and "ref 1 two" in text
    assert "a blue square" in text  # the blind baseline's caption


def test_summary_has_the_table_the_best_and_three_samples():
    text = summarize_report(make_report(RESULTS))
    lines = text.splitlines()
    assert lines[0] == "evaluation report (runs/x/eval/report.json, runs/x/eval/report.html):"
    assert sum("FAILED: OSError" in line for line in lines) == 1
    assert sum(line.endswith("<- best") for line in lines) == 1
    assert "CIDEr 1.500 vs 0.100 for the blind baseline" in text
    samples = [line.split(":")[0].strip() for line in lines if line.strip().startswith("image ")]
    assert samples == ["image 1", "image 2", "image 3"]


def test_chart_of_one_point_or_flat_values_is_still_drawn():
    single = line_chart("one", [("phase 1", "#000", [(100, 0.5)], False)])
    flat = line_chart("flat", [("phase 1", "#000", [(100, 0.5), (200, 0.5)], False)])
    for svg in (single, flat):
        assert svg.startswith("<svg") and "nan" not in svg.lower() and "inf" not in svg.lower()
    assert line_chart("empty", []) == ""
