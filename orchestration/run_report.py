"""The run report, `<run_root>/report.html`: one page for a whole `showtell run`.

    html_text = build_run_report(config)    # pure: reads the run root, writes nothing
    url = write_run_report(config)          # <run_root>/report.html (`showtell report`, the end of a run)

It gathers what the steps already write, and reads nothing else:

- Data: `data/preprocess_report.json`: records per split, skips by reason with the first skipped
  files' names, the vocabulary's size, the train captions' words, the captions' lengths, the
  images' sizes.
- Data checks: `data_checks.json`: each anomaly in words (the run stopped before training), or
  that every check passed against the promoted model, or that there was none to compare with;
  each check's value, the champion's, its threshold and its config key.
- Training, per phase: `train/phaseN/history.jsonl` (loss, perplexity, learning rate and
  examples/s per report), `final/state.json`, and the manifest's record of the step: its wall
  time and the workers (`ray.num_workers` of its fingerprint). A resume is an attempt that went on
  from a checkpoint: its history rows carry `resumed_from_step` > 0 (Ray's restarts after a worker
  failure, a killed run resumed, a phase given more steps). An attempt that died before its first
  report leaves no row, and no trace here.
- Evaluation: `eval/report.json`: the metrics table and the best checkpoint, and a link to
  `eval/report.html`.
- Promotion: `promote.json`: the decision, the new and the current model's values, and why.
- Steps: `manifest.json` and `showtell status`'s view of it: each step's state, duration, why it
  last ran, and its log, `logs/<step>.log`.

Like `eval/report.html` (whose table, charts and style it reuses) the page is one self-contained
file: inline CSS and SVG, no script, nothing fetched. A section whose inputs are missing (a run
stopped by `--until`, a failed step) says so, and the rest of the page is still written.
"""

from __future__ import annotations

import datetime
import html
from typing import Any, Callable, Optional, Sequence

import yaml

from orchestration.manifest import Manifest, relative
from orchestration.steps import decision_file
from pipelines.data_checks import CAPTION_LENGTHS, OOV_RATE, RECORDS, SKIP_RATE, data_checks_file
from pipelines.eval_report import PAGE_CSS, PHASE_COLOURS, find_checkpoint, format_number, line_chart, metrics_table
from schemas.config import Config, join_url
from schemas.layout import (
    CONFIG_FILE,
    EVAL_HTML_FILE,
    EVAL_REPORT_FILE,
    FINAL_DIR,
    HISTORY_FILE,
    LOGS_DIR,
    PREPROCESS_REPORT_FILE,
    RUN_REPORT_FILE,
    STATE_FILE,
)
from schemas.storage import exists, read_json, read_text, write_text
from trainer.warm_start import init_source, training_config, warm_start_dir

# The charts drawn per training phase: (history column, chart title).
TRAINING_CHARTS = (
    ("loss", "loss"),
    ("perplexity", "perplexity"),
    ("learning_rate", "learning rate"),
    ("examples_per_sec", "examples/s"),
)
PHASES = (1, 2)
SPLITS = ("train", "val", "test")

_CSS = (
    PAGE_CSS
    + """
.missing { color: #8a5a00; background: #fff8e6; border-left: 3px solid #e0a800; padding: 4px 8px; }
.error { color: #a00; }
table.metrics td.files { text-align: left; font-family: monospace; font-size: 12px; }
table.metrics th.text, table.metrics th.files { text-align: left; }
nav a { margin-right: 12px; }
"""
)


def _e(value: Any) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value))


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _html_table(header: Optional[Sequence[str]], rows: Sequence[Sequence[str]], classes: dict[int, str]) -> str:
    """A table in eval/report.html's style, with a CSS class per column index (`text`: left-aligned);
    the cells are HTML already (escape them first)."""
    cell = {i: f' class="{name}"' for i, name in classes.items()}
    head = "".join(f"<th{cell.get(i, '')}>{_e(h)}</th>" for i, h in enumerate(header or ()))
    head = f"<thead><tr>{head}</tr></thead>" if header else ""
    body = "".join(
        "<tr>" + "".join(f"<td{cell.get(i, '')}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f'<table class="metrics">{head}<tbody>{body}</tbody></table>'


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _link(url: str, run_root: str, text: Optional[str] = None) -> str:
    """A link to `url`, relative when it lies under the run root (the page opens from there)."""
    href = relative(url, run_root)
    return f'<a href="{_e(href)}">{_e(text or href)}</a>'


# ---------------------------------------------------------------------------------------------
# Data


def _bar_chart(title: str, x_label: str, counts: dict[int, int], width: int = 520, height: int = 230) -> str:
    """An inline SVG histogram: one bar per value of `counts` ({value: count})."""
    left, right, top, bottom = 52, 12, 26, 42
    if not counts:
        return ""
    low, high, peak = min(counts), max(counts), max(counts.values()) or 1
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / (high - low + 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(title)}">',
        f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="13" font-weight="600">{_e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for fraction in (0, 0.5, 1):
        y = top + (1 - fraction) * plot_h
        parts.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{round(peak * fraction)}</text>'
        )
    for value, count in sorted(counts.items()):
        bar_h = count / peak * plot_h
        x = left + (value - low) * slot
        parts.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{max(slot - 2, 1):.1f}" '
            f'height="{bar_h:.1f}" fill="{PHASE_COLOURS[1]}"><title>{value}: {count}</title></rect>'
        )
    label_every = max(1, (high - low + 1) // 12)
    for value in range(low, high + 1, label_every):
        x = left + (value - low + 0.5) * slot
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle" font-size="10">{value}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" text-anchor="middle" font-size="11">')
    parts.append(f"{_e(x_label)}</text></svg>")
    return "".join(parts)


def _size_text(size: Optional[dict]) -> str:
    return "-" if not size else f"{size['min']} / {size['median']} / {size['max']}"


def _data_section(config: Config, manifest: Manifest) -> str:
    url = join_url(config.data_dir, PREPROCESS_REPORT_FILE)
    report = read_json(url)
    if report is None:
        return _missing(f"No preprocess report at {url}: the preprocess step has not finished in this run root.")
    # preprocess_report.json's keys are sorted by name: train, val, test again (any other last).
    splits = {name: report["splits"][name] for name in sorted(report["splits"], key=lambda n: (*SPLITS, n).index(n))}
    rows = []
    for split, entry in splits.items():
        images, captions = entry["images"], entry["captions"]
        size = images.get("size") or {}
        rows.append(
            [
                _e(split),
                _e(entry["shards"]),
                _e(images["listed"]),
                _e(images["written"]),
                _e(sum(images["skipped"].values())),
                _e(captions["listed"]),
                _e(entry["records_written"]),
                _e(_size_text(size.get("width"))),
                _e(_size_text(size.get("height"))),
            ]
        )
    header = ["split", "shards", "images", "written", "skipped", "captions", "records", "width px", "height px"]
    parts = [
        _html_table(header, rows, {0: "text"}),
        '<p class="meta">width and height: min / median / max of the written images, in pixels.</p>',
    ]
    skips = []
    for split, entry in splits.items():
        images, captions = entry["images"], entry["captions"]
        for reason, count in sorted(images["skipped"].items()):
            files = images.get("skipped_files", {}).get(reason)
            files_text = "<br>".join(_e(name) for name in files) if files else "(not recorded)"
            if files and count > len(files):
                files_text += f"<br>... and {count - len(files)} more"
            skips.append([_e(split), _e(reason), _e(count), _e(captions["skipped"].get(reason, 0)), files_text])
    parts.append("<h3>Skipped images</h3>")
    if skips:
        header = ["split", "reason", "images", "captions", "first files (by name)"]
        parts.append(_html_table(header, skips, {0: "text", 1: "text", 4: "files"}))
    else:
        parts.append("<p>No image was skipped.</p>")
    dropped = {key: value for key, value in report.get("annotations", {}).items() if value}
    if dropped:
        text = ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in sorted(dropped.items()))
        parts.append(f'<p class="meta">dropped before splitting: {_e(text)}</p>')
    vocab = report["vocabulary"]
    parts.append(
        f"<p>Vocabulary: <b>{_e(vocab['words'])} words</b> seen at least {_e(vocab['min_word_count'])} times in the "
        f"training captions (&lt;UNK&gt; id {_e(vocab['unknown_id'])}). {_e(report['records_written'])} records "
        f"written in {_e(report['seconds'])} s.</p>"
    )
    frequencies = report.get("word_frequencies")
    if frequencies:
        file = _link(join_url(config.data_dir, frequencies["file"]), config.run_root)
        parts.append(
            f'<p class="meta">{_e(frequencies["split"])} captions: {_e(frequencies["words"])} words, '
            f'{_e(frequencies["distinct"])} distinct, each counted in {file}.</p>'
        )
    lengths: dict[int, int] = {}
    for entry in splits.values():
        for length, count in entry["captions"].get("lengths", {}).items():
            lengths[int(length)] = lengths.get(int(length), 0) + count
    if lengths:
        chart = _bar_chart("caption lengths (all splits)", "tokens per caption (without <S> and </S>)", lengths)
        parts.append(f'<div class="charts">{chart}</div>')
    else:
        parts.append(_missing("Caption lengths were not recorded by this preprocess run."))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Data checks


# What each kind of data check is called on the page.
CHECK_NAMES = {
    SKIP_RATE: "skipped images",
    CAPTION_LENGTHS: "caption lengths",
    OOV_RATE: "out-of-vocabulary words",
    RECORDS: "records",
}


def _check_value(check: dict, value: Any) -> str:
    """A check's value as people read it: records as a count, rates and shares in percent."""
    if value is None:
        return "-"
    return str(value) if check["check"] == RECORDS else f"{value:.1%}"


def _check_threshold(check: dict) -> str:
    if check["check"] == RECORDS:
        return f"{check['key']} {check['threshold']:g} (at least {check['threshold']:.0%} of the champion's)"
    if check["check"] == CAPTION_LENGTHS:
        return f"{check['key']} {check['threshold']:g} (distance {check['distance']:.2f})"
    return f"{check['key']} {check['threshold']:g} (at most {check['threshold'] * 100:.1f} points more)"


def _checks_section(config: Config, manifest: Manifest) -> str:
    url = data_checks_file(config)
    record = read_json(url)
    if record is None:
        return _missing(f"No data checks at {url}: the check-data step has not finished in this run root.")
    baseline = record.get("baseline") or {}
    if record.get("note"):
        return f"<p>The data was not checked: {_e(record['note'])}.</p>"
    checks, anomalies = record["checks"], record["anomalies"]
    champion = f"the promoted model {baseline.get('id')} (trained on {baseline.get('run_root')})"
    if anomalies:
        items = "".join(f"<li>{_e(text)}</li>" for text in anomalies)
        parts = [
            f'<p class="error"><b>{len(anomalies)} anomal{"y" if len(anomalies) == 1 else "ies"} against '
            f"{_e(champion)}: the run stopped before training.</b></p><ul>{items}</ul>"
        ]
    else:
        parts = [f"<p><b>All {len(checks)} data checks passed</b> against {_e(champion)}.</p>"]
    rows = []
    for check in checks:
        what = check.get("reason") if check["check"] == SKIP_RATE else check.get("length")
        rows.append(
            [
                _e(CHECK_NAMES.get(check["check"], check["check"])),
                _e(check["split"]),
                _e("-" if what is None else what),
                _e(_check_value(check, check["value"])),
                _e(_check_value(check, check["champion_value"])),
                _e(_check_threshold(check)),
                "passed" if check["passed"] else '<b class="error">anomaly</b>',
            ]
        )
    if rows:
        header = ["check", "split", "reason or length", "this run", "champion's data", "threshold", "result"]
        parts.append(_html_table(header, rows, {0: "text", 1: "text", 2: "text", 5: "text", 6: "text"}))
    if record.get("not_compared"):
        parts.append(f'<p class="meta">Not compared: {_e("; ".join(record["not_compared"]))}.</p>')
    parts.append(f'<p class="meta">Every check and both sides\' statistics: {_link(url, config.run_root)}.</p>')
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Training


def _phase_dir(config: Config, phase: int) -> str:
    return join_url(config.train_dir, f"phase{phase}")


def _read_history(url: str) -> list[dict]:
    from trainer.checkpoints import read_history

    return read_history(url)


def _workers(config: Config, phase: int, record: Optional[dict]) -> tuple[Any, str]:
    """The phase's `ray.num_workers` and where it comes from: the config the phase was trained
    with (its final/config.yaml, or the manifest's fingerprint of the step), else this config."""
    trained = join_url(_phase_dir(config, phase), FINAL_DIR, CONFIG_FILE)
    if exists(trained):
        return yaml.safe_load(read_text(trained))["ray"]["num_workers"], "final/config.yaml"
    recorded = ((record or {}).get("basis") or {}).get("config", {}).get("ray.num_workers")
    if recorded is not None:
        return recorded, "manifest"
    return config.ray.num_workers, "this config"


def _resumes(history: Sequence[dict]) -> list[int]:
    """The steps the phase's attempts went on from, in order (an attempt from scratch is not one)."""
    starts: list[int] = []
    for row in history:
        start = row.get("resumed_from_step") or 0
        if start and start not in starts:
            starts.append(start)
    return starts


def _training_section(config: Config, manifest: Manifest) -> str:
    histories = {phase: _read_history(join_url(_phase_dir(config, phase), HISTORY_FILE)) for phase in PHASES}
    warm = read_json(join_url(warm_start_dir(config), STATE_FILE)) if init_source(config) is not None else None
    # Phase 2 counts its steps on from phase 1's last, as the evaluation's charts do (from 0 after a warm start).
    offsets = {1: 0, 2: 0 if warm else histories[1][-1]["step"] if histories[1] else config.train.phase1.steps}
    rows, missing = [], []
    for phase in PHASES:
        history = histories[phase]
        record = manifest.step(f"train-phase{phase}")
        history_url = join_url(_phase_dir(config, phase), HISTORY_FILE)
        if phase == 1 and warm is not None:
            remap = warm["remap"]
            missing.append(
                f"<p>Phase 1: none. A warm start from {_e(warm['init_from'])} (vocabulary "
                f"{_e(warm['init_vocabulary_id'])} remapped to the data's {_e(warm['vocabulary_id'])}: "
                f"{_e(remap['kept'])} words kept, {_e(remap['added'])} added, {_e(remap['dropped'])} dropped); "
                "phase 2 fine-tunes it.</p>"
            )
            continue
        if not history:
            missing.append(
                _missing(f"Phase {phase}: no training history at {history_url}: this phase has not trained here yet.")
            )
            continue
        workers, source = _workers(config, phase, record)
        resumes = _resumes(history)
        resumed = f"{len(resumes)}: from step {', '.join(map(str, resumes))}" if resumes else "none"
        last = history[-1]
        span = (last.get("wall_time") or 0) - (history[0].get("wall_time") or 0)
        rows.append(
            [
                _e(phase),
                _e(f"{last['step']} of {training_config(config, phase).train.phase(phase).steps}"),
                _e(len(history)),
                _e(_duration((record or {}).get("seconds"))),
                _e(_duration(span)),
                _e(f"{workers} ({source})"),
                _e(resumed),
                _e(format_number(last.get("loss"))),
                _e(format_number(last.get("perplexity"), 2)),
                _link(history_url, config.run_root, HISTORY_FILE),
            ]
        )
    parts = []
    if rows:
        header = [
            "phase",
            "step",
            "reports",
            "wall time",
            "first to last report",
            "workers",
            "resumes",
            "loss",
            "perplexity",
            "history",
        ]
        parts.append(_html_table(header, rows, {5: "text", 6: "text", 9: "text"}))
        parts.append(
            '<p class="meta">wall time: the step\'s last run in the manifest (a resumed step: its last attempt). '
            "resumes: attempts that went on from a checkpoint (after a failure, a killed run, or more steps), "
            "from history.jsonl's resumed_from_step.</p>"
        )
    parts.extend(missing)
    charts = []
    for column, title in TRAINING_CHARTS:
        series = [
            (
                f"phase {phase}",
                PHASE_COLOURS[phase],
                [
                    (row["step"] + offsets[phase], row[column])
                    for row in histories[phase]
                    if row.get(column) is not None
                ],
                False,
            )
            for phase in PHASES
            if histories[phase]
        ]
        charts.append(line_chart(f"{title} vs step", [s for s in series if s[2]]))
    if any(charts):
        parts.append('<div class="charts">' + "\n".join(chart for chart in charts if chart) + "</div>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Evaluation and promotion


def _evaluation_section(config: Config, manifest: Manifest) -> str:
    url = join_url(config.eval_dir, EVAL_REPORT_FILE)
    report = read_json(url)
    if report is None:
        return _missing(f"No evaluation report at {url}: the evaluate step has not finished in this run root.")
    counts = report["counts"]
    page = _link(join_url(config.eval_dir, EVAL_HTML_FILE), config.run_root, "the evaluation report")
    parts = [
        f"<p>{_e(report['split'])} split, {_e(report['images'])} images; {_e(counts['checkpoints'])} checkpoints, "
        f"{_e(counts['ok'])} evaluated, {_e(counts['failed'])} failed. Captions, charts and sample images: {page}.</p>"
    ]
    best = report.get("best")
    if best:
        entry = find_checkpoint(report, best["checkpoint"])
        parts.append(
            f"<p><b>best by {_e(best['select_by'])}: phase {_e(entry['phase'])} {_e(entry['kind'])} step "
            f"{_e(entry['step'])}, {_e(best['select_by'])} {_e(format_number(best['value']))}</b> "
            f'<span class="meta">({_e(entry["url"])})</span></p>'
        )
    else:
        parts.append("<p><b>No checkpoint could be evaluated.</b></p>")
    parts.append(metrics_table(report))
    return "\n".join(parts)


def _promotion_section(config: Config, manifest: Manifest) -> str:
    url = decision_file(config)
    decision = read_json(url)
    if decision is None:
        return _missing(f"No promotion decision at {url}: the promote step has not finished in this run root.")
    metric = decision["metric"]
    previous = decision.get("previous_model") or {}
    measured = decision.get("measured_on") or {}
    rows = [
        ["decision", f"<b>{_e(decision['decision'].replace('_', ' '))}</b>"],
        ["reason", _e(decision.get("reason", "-"))],
        [f"new model's {_e(metric)}", _e(format_number(decision["new_value"], 4))],
        [f"current model's {_e(metric)}, on the same data", _e(format_number(decision["current_value"], 4))],
        ["threshold applied", _e(format_number(decision.get("threshold"), 4))],
        ["promote.min_value, promote.tolerance", _e(f"{decision.get('min_value')}, {decision['tolerance']:g}")],
        ["measured on", _e(_measured_on(measured.get("new")))],
        ["new model", _e(decision["export"])],
        ["promoted model", _e(decision["model"] or "-")],
        ["model that was current", _e(previous.get("location", "-"))],
        ["decided", _e(decision["time"])],
    ]
    return _html_table(None, rows, {0: "text", 1: "text"})


def _measured_on(where: Optional[dict]) -> str:
    """The data both values were measured on, in words."""
    if not where:
        return "-"
    return f"{where['images']} images of the {where['split']} split of {where['run_root']} (data {where['data'][:12]})"


# ---------------------------------------------------------------------------------------------
# Steps


def _steps_section(config: Config, manifest: Manifest) -> str:
    from orchestration.run import step_status

    records = manifest.data["steps"]
    if not records:
        return _missing(f"No step has run in this run root: {manifest.url} is absent or empty.")
    rows = []
    for status in step_status(config):
        record = records.get(status.name) or {}
        log_url = join_url(config.run_root, LOGS_DIR, f"{status.name}.log")
        log_cell = (
            _link(log_url, config.run_root) if exists(log_url) else f"{_e(relative(log_url, config.run_root))} (none)"
        )
        why = record.get("reason") or "-"
        if status.error:
            why = f'{_e(why)}<br><span class="error">error: {_e(status.error)}</span>'
        else:
            why = _e(why)
        state = status.state if status.state != "-" else "not run"
        rows.append(
            [
                _e(status.name),
                _e(state),
                _e((status.start or "-")[:19].replace("T", " ")),
                _e(_duration(status.seconds)),
                _e(status.fingerprint),
                why,
                log_cell,
            ]
        )
    header = ["step", "state", "started (UTC)", "duration", "fingerprint", "why it ran", "log"]
    return _html_table(header, rows, {0: "text", 1: "text", 4: "text", 5: "text", 6: "text"})


# ---------------------------------------------------------------------------------------------
# The page


SECTIONS: tuple[tuple[str, str, Callable[[Config, Manifest], str]], ...] = (
    ("data", "Data", _data_section),
    ("checks", "Data checks", _checks_section),
    ("training", "Training", _training_section),
    ("evaluation", "Evaluation", _evaluation_section),
    ("promotion", "Promotion", _promotion_section),
    ("steps", "Steps", _steps_section),
)


def _section(config: Config, manifest: Manifest, build: Callable[[Config, Manifest], str]) -> str:
    """One section's HTML; unreadable inputs (e.g. a half-written JSON file) are shown, not raised."""
    try:
        return build(config, manifest)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f'<p class="error">Could not read this section\'s inputs: {_e(type(error).__name__)}: {_e(error)}</p>'


def build_run_report(config: Config) -> str:
    """report.html's text for the run root of `config`, from whatever its steps have written."""
    manifest = Manifest.load(config.run_root)
    last_run = manifest.data.get("last_run") or {}
    run_text = (
        f"run {last_run['run_id']} started {last_run['started'][:19].replace('T', ' ')} UTC on {last_run['host']}"
        if last_run.get("run_id")
        else "no `showtell run` recorded"
    )
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    nav = "".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title, _ in SECTIONS)
    body = "\n".join(
        f'<h2 id="{anchor}">{_e(title)}</h2>\n{_section(config, manifest, build)}' for anchor, title, build in SECTIONS
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>showtell run: {_e(config.run_root)}</title>
<style>{_CSS}</style></head>
<body>
<h1>showtell run report</h1>
<p class="meta">{_e(config.run_root)} &middot; {_e(run_text)} &middot; written {_e(created)}</p>
<nav>{nav}</nav>
{body}
</body></html>
"""


def write_run_report(config: Config) -> str:
    """Writes `<run_root>/report.html` and returns its URL."""
    url = join_url(config.run_root, RUN_REPORT_FILE)
    write_text(url, build_run_report(config))
    return url
