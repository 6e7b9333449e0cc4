"""The evaluation report: report.json, report.html and best.json, and its text summary.

    report = build_report(results, split="test", select_by="CIDEr", summary={...}, created="...")
    write_report(output_dir, report, sample_images)     # {image id: JPEG bytes} shown in the HTML
    print(summarize_report(report))

report.json holds, per checkpoint: phase, step (the phase's), global_step (steps in all: phase 2
counts on from phase 1's last), kind (`final` or `intermediate`), url, status (`ok` or `failed`
with `error`), perplexity, every metric, the blind baseline (the caption of a blank grey image,
scored as the caption of every image) and the captions: per image its id, generated caption, its
probability and its references. best.json names the best `ok` checkpoint by `select_by`.

report.html is one self-contained file: inline CSS, inline SVG charts, images as data: URIs, no
script and nothing fetched, so it opens offline in any browser.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Mapping, Optional, Sequence

from schemas.config import METRICS, join_url
from schemas.layout import BEST_FILE, EVAL_HTML_FILE, EVAL_REPORT_FILE
from schemas.storage import write_text

PHASE_COLOURS = {1: "#1f77b4", 2: "#d62728"}  # chart series per phase
BLIND_COLOUR = "#7f7f7f"


# ---------------------------------------------------------------------------------------------
# report.json and best.json


def select_best(checkpoints: Sequence[dict], select_by: str) -> Optional[dict]:
    """best.json's content: the `ok` checkpoint with the highest `select_by`; ties go to a
    `final` (self-contained: config and vocabulary beside the weights), then the later step.
    None when no checkpoint has the metric."""
    scored = [c for c in checkpoints if c["status"] == "ok" and c["metrics"].get(select_by) is not None]
    if not scored:
        return None
    best = max(scored, key=lambda c: (c["metrics"][select_by], c["kind"] == "final", c["global_step"] or -1))
    return {
        "select_by": select_by,
        "value": best["metrics"][select_by],
        "checkpoint": {k: best[k] for k in ("phase", "step", "kind", "url")},
    }


def checkpoint_order(checkpoint: Mapping) -> tuple:
    """Sort key of a checkpoint {phase, step, kind}: by phase, then step (unknown last), a final
    after the kept checkpoint it copies."""
    return checkpoint["phase"], checkpoint["step"] is None, checkpoint["step"] or 0, checkpoint["kind"] == "final"


def build_report(
    results: Sequence[dict],
    *,
    split: str,
    select_by: str,
    summary: Mapping,
    created: str,
    baseline: Optional[dict] = None,
) -> dict:
    """One report from every checkpoint's result (any order): checkpoints sorted by phase, step
    and kind, counts of ok and failed ones, the best, and the baseline's result (the promoted
    model on the same images, with its promotion `id` and `run_root`; None without one)."""
    checkpoints = sorted(results, key=checkpoint_order)
    ok = [c for c in checkpoints if c["status"] == "ok"]
    return {
        "created": created,
        "split": split,
        **summary,
        "images": max((len(c["captions"]) for c in ok), default=0),
        "counts": {"checkpoints": len(checkpoints), "ok": len(ok), "failed": len(checkpoints) - len(ok)},
        "select_by": select_by,
        "best": select_best(checkpoints, select_by),
        "checkpoints": list(checkpoints),
        "baseline": baseline,
    }


def write_report(output_dir: str, report: dict, images: Mapping[int, bytes]) -> None:
    """report.json, report.html (with `images`) and, when a checkpoint succeeded, best.json."""
    write_text(join_url(output_dir, EVAL_REPORT_FILE), json.dumps(report, indent=1) + "\n")
    write_text(join_url(output_dir, EVAL_HTML_FILE), report_html(report, images))
    if report["best"] is not None:
        write_text(join_url(output_dir, BEST_FILE), json.dumps(report["best"], indent=1) + "\n")


def find_checkpoint(report: dict, ref: Mapping) -> dict:
    """The report's entry for a {phase, step, kind, url} (e.g. best.json's checkpoint)."""
    return next(c for c in report["checkpoints"] if c["url"] == ref["url"])


def _metric_names(report: dict) -> list[str]:
    """The metrics the report holds, in `METRICS` order."""
    present = {name for c in report["checkpoints"] if c["status"] == "ok" for name in c["metrics"]}
    return [name for name in METRICS if name in present]


def format_number(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Text summary (the CLI and the demo print it)


def summarize_report(report: dict, samples: int = 3) -> str:
    """The metrics table, the best checkpoint beside its blind baseline, and `samples` captions."""
    names = _metric_names(report)
    counts = report["counts"]
    report_json, report_html = (join_url(report["eval_dir"], name) for name in (EVAL_REPORT_FILE, EVAL_HTML_FILE))
    lines = [
        f"evaluation report ({report_json}, {report_html}):",
        f"  {report['split']} split, {report['images']} images; {counts['checkpoints']} checkpoints, "
        f"{counts['ok']} evaluated, {counts['failed']} failed",
        f"  {'phase':<6}{'step':>7}  {'kind':<13}{'perplexity':>11}" + "".join(f"{name:>9}" for name in names),
    ]
    best_url = report["best"]["checkpoint"]["url"] if report["best"] else None
    for c in report["checkpoints"]:
        head = f"  {c['phase']:<6}{c['step'] if c['step'] is not None else '?':>7}  {c['kind']:<13}"
        if c["status"] != "ok":
            lines.append(f"{head}FAILED: {c['error']}")
            continue
        row = f"{format_number(c['perplexity'], 2):>11}"
        row += "".join(f"{format_number(c['metrics'].get(n)):>9}" for n in names)
        lines.append(head + row + ("   <- best" if c["url"] == best_url else ""))
    baseline = report.get("baseline")
    if baseline is not None:
        head = f"  promoted model {baseline['id']} (trained on {baseline['run_root']}), on the same images:"
        if baseline["status"] != "ok":
            lines.append(f"{head} FAILED: {baseline['error']}")
        else:
            lines.append(head + "".join(f" {n} {format_number(baseline['metrics'].get(n))}" for n in names))
    if report["best"] is None:
        lines.append("  no checkpoint could be evaluated")
        return "\n".join(lines)
    best = find_checkpoint(report, report["best"]["checkpoint"])
    select_by = report["select_by"]
    lines.append(
        f"  best by {select_by}: phase {best['phase']} {best['kind']} step {best['step']} ({best['url']}): "
        f"{select_by} {format_number(best['metrics'][select_by])} "
        f"vs {format_number(best['blind']['metrics'][select_by])} "
        f'for the blind baseline (a blank image: "{best["blind"]["caption"]}")'
    )
    lines.append("  sample captions (best checkpoint):")
    for caption in best["captions"][:samples]:
        lines.append(f"    image {caption['image_id']}: {caption['caption']} (p={caption['p']:.6f})")
        lines.append(f"      references: {' | '.join(caption['references'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# report.html

# The page's style; the run report (orchestration/run_report.py) builds on it.
PAGE_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; }
.meta { color: #555; font-size: 13px; }
table.metrics { border-collapse: collapse; font-size: 13px; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.metrics th { background: #f0f0f0; } table.metrics td.text { text-align: left; }
tr.best td { background: #fff4c2; font-weight: 600; } tr.failed td { color: #a00; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.charts svg { border: 1px solid #ddd; background: #fff; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 14px; }
figure { margin: 0; border: 1px solid #ddd; padding: 8px; font-size: 13px; }
figure img { width: 100%; height: auto; image-rendering: auto; display: block; }
.generated { margin: 6px 0 2px; } .generated b { color: #0a5; }
ol.refs { margin: 4px 0 0 18px; padding: 0; color: #444; }
"""


def _image_uri(data: bytes) -> str:
    """A data: URI for image bytes (JPEG, or PNG/GIF kept under a .jpg name)."""
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/gif" if data[:4] == b"GIF8" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def _tick_label(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


Series = Sequence[tuple[str, str, Sequence[tuple[float, float]], bool]]  # (label, colour, [(x, y)], dashed) each


def line_chart(title: str, series: Series, width: int = 360, height: int = 230) -> str:
    """An inline SVG line chart. `series`: (label, colour, [(x, y), ...], dashed) each."""
    left, right, top, bottom = 52, 12, 26, 42
    points = [p for _, _, data, _ in series for p in data]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    pad = (y_high - y_low) * 0.08 or max(abs(y_high) * 0.1, 0.01)
    y_low, y_high = y_low - pad, y_high + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    def text(x: float, y: float, content: str, size: int, anchor: str = "middle", extra: str = "") -> str:
        attributes = f'x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}"{extra}'
        return f"<text {attributes}>{html.escape(content)}</text>"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        text(width / 2, 16, title, 13, extra=' font-weight="600"'),
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for y in _ticks(y_low, y_high):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        parts.append(text(left - 4, sy(y) + 4, _tick_label(y), 10, anchor="end"))
    for x in _ticks(x_low, x_high):
        parts.append(text(sx(x), top + plot_h + 14, _tick_label(x), 10))
    parts.append(text(left + plot_w / 2, height - 14, "training step (both phases)", 11))
    legend_x = left
    for label, colour, data, dashed in series:
        data = sorted(data)
        stroke = f'stroke="{colour}" stroke-width="2"' + (' stroke-dasharray="5,4"' if dashed else "")
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in data)
        parts.append(f'<polyline points="{coords}" fill="none" {stroke}/>')
        if not dashed:
            parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in data)
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 16}" y1="{height - 4}" y2="{height - 4}" {stroke}/>')
        parts.append(text(legend_x + 20, height - 1, label, 10, anchor="start"))
        legend_x += 28 + 6 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def _chart_series(report: dict, value_of) -> list[tuple[str, str, list[tuple[float, float]], bool]]:
    """Per phase, (global step, value) of every ok checkpoint with a known step."""
    series = []
    for phase, colour in PHASE_COLOURS.items():
        data = [
            (c["global_step"], value_of(c))
            for c in report["checkpoints"]
            if c["phase"] == phase and c["status"] == "ok" and c["global_step"] is not None and value_of(c) is not None
        ]
        if data:
            series.append((f"phase {phase}", colour, sorted(set(data)), False))
    return series


def _charts(report: dict) -> str:
    charts = []
    names = _metric_names(report)
    for name in sorted(names, key=lambda n: n != report["select_by"]):  # the metric that picks the best first
        series = _chart_series(report, lambda c, n=name: c["metrics"].get(n))
        blind = _chart_series(report, lambda c, n=name: c["blind"]["metrics"].get(n))
        blind_points = sorted(p for _, _, data, _ in blind for p in data)
        if blind_points:
            series.append(("blind baseline", BLIND_COLOUR, blind_points, True))
        charts.append(line_chart(f"{name} vs step", series))
    charts.append(line_chart("perplexity vs step (teacher-forced)", _chart_series(report, lambda c: c["perplexity"])))
    return "\n".join(chart for chart in charts if chart)


def metrics_table(report: dict) -> str:
    names = _metric_names(report)
    select_by = report["select_by"]
    best_url = report["best"]["checkpoint"]["url"] if report["best"] else None
    columns = ["phase", "step", "kind", "status", "perplexity", *names, f"blind {select_by}", "seconds"]
    head = "".join(f"<th>{column}</th>" for column in columns)
    rows = []
    baseline = report.get("baseline")
    shown = [
        (c, [str(c["phase"]), "?" if c["step"] is None else str(c["step"]), c["kind"]]) for c in report["checkpoints"]
    ]
    if baseline is not None:  # the promoted model, on the same images: the gate's other value
        shown.append((baseline, ["-", "-", f"promoted model {baseline['id']}"]))
    for c, cells in shown:
        first = "".join(f"<td{' class=text' if i == 2 else ''}>{html.escape(v)}</td>" for i, v in enumerate(cells))
        title = f' title="{html.escape(c["url"])}"'
        if c["status"] != "ok":
            rows.append(
                f'<tr class="failed"{title}>{first}<td class="text">failed</td>'
                f'<td class="text" colspan="{len(names) + 3}">{html.escape(c["error"])}</td></tr>'
            )
            continue
        values = [format_number(c["perplexity"], 2), *(format_number(c["metrics"].get(n)) for n in names)]
        values += [format_number(c["blind"]["metrics"].get(select_by)), f"{c['seconds']:.1f}"]
        css = ' class="best"' if c["url"] == best_url else ""
        cells_html = "".join(f"<td>{v}</td>" for v in values)
        rows.append(f'<tr{css}{title}>{first}<td class="text">ok</td>{cells_html}</tr>')
    return f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _samples(report: dict, images: Mapping[int, bytes]) -> str:
    """Each sample image with the best checkpoint's caption, each final's, the blind one's, and its references."""
    if report["best"] is None or not images:
        return "<p>No images to show.</p>"
    best = find_checkpoint(report, report["best"]["checkpoint"])
    shown = [("best", best)] + [
        (f"phase {c['phase']} final", c)
        for c in report["checkpoints"]
        if c["kind"] == "final" and c["status"] == "ok" and c["url"] != best["url"]
    ]
    by_image = [({x["image_id"]: x for x in c["captions"]}, label, c) for label, c in shown]
    figures = []
    for image_id, data in images.items():
        lines = []
        for captions, label, c in by_image:
            if image_id in captions:
                entry = captions[image_id]
                lines.append(
                    f'<p class="generated"><b>{html.escape(label)}</b> (phase {c["phase"]} step {c["step"]}): '
                    f"{html.escape(entry['caption'])} <small>(p={entry['p']:.4f})</small></p>"
                )
        if not lines:
            continue
        refs = next((captions[image_id]["references"] for captions, _, _ in by_image if image_id in captions), [])
        figures.append(
            f'<figure><img src="{_image_uri(data)}" alt="test image {image_id}">'
            f"<figcaption><div>image {image_id}</div>{''.join(lines)}"
            f'<div>references:</div><ol class="refs">{"".join(f"<li>{html.escape(r)}</li>" for r in refs)}</ol>'
            f"</figcaption></figure>"
        )
    blind = best["blind"]
    note = (
        f'<p class="meta">Blind baseline of the best checkpoint (a blank grey image, the same caption for every '
        f'image): "{html.escape(blind["caption"])}"</p>'
    )
    return note + f'<div class="samples">{"".join(figures)}</div>'


def report_html(report: dict, images: Mapping[int, bytes]) -> str:
    """report.html's text: header, metrics table, metric-vs-step charts, sample images."""
    select_by = report["select_by"]
    counts = report["counts"]
    if report["best"]:
        best = find_checkpoint(report, report["best"]["checkpoint"])
        best_text = (
            f"best by {select_by}: phase {best['phase']} {best['kind']} step {best['step']}, "
            f"{select_by} {format_number(best['metrics'][select_by])} (blind baseline "
            f"{format_number(best['blind']['metrics'].get(select_by))})"
        )
    else:
        best_text = "no checkpoint could be evaluated"
    eval_cfg = report["eval"]
    settings = (
        f"beam size {eval_cfg['beam_size']}, at most {eval_cfg['max_caption_length']} words, "
        f"length normalisation {eval_cfg['length_normalization']}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>showtell evaluation: {html.escape(report["run_root"])}</title>
<style>{PAGE_CSS}</style></head>
<body>
<h1>showtell evaluation</h1>
<p class="meta">run {html.escape(report["run_root"])} &middot; {html.escape(report["split"])} split,
{report["images"]} images &middot; {counts["checkpoints"]} checkpoints ({counts["ok"]} evaluated,
{counts["failed"]} failed) &middot; {html.escape(settings)} &middot; {html.escape(report["created"])}</p>
<p><b>{html.escape(best_text)}</b></p>
<h2>Metrics</h2>
<p class="meta">COCO caption metrics (pycocoevalcap; 0-1, CIDEr 0-10) against all references of each image;
perplexity is teacher-forced over every record of the split; blind: the caption of a blank image,
scored as every image's caption.</p>
{metrics_table(report)}
<h2>Metrics vs training step</h2>
<div class="charts">
{_charts(report)}
</div>
<h2>Sample {html.escape(report["split"])} images</h2>
{_samples(report, images)}
</body></html>
"""
