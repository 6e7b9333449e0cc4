"""`showtell evaluate` (pipelines/evaluate.py): listing checkpoints, reading the split, the inputs
it refuses; and, on the demo's trained run (slow), the whole Beam pipeline: its three files, a
corrupt checkpoint reported and not fatal, metrics equal to pycocoevalcap's own on the same
captions, the model beating a blind baseline, no Java left running, and a real browser's
screenshot of report.html."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipelines.eval_inputs import blank_jpeg, reference_of, split_images
from pipelines.evaluate import FINAL, INTERMEDIATE, CheckpointRef, list_checkpoints, plan_from_config, run_evaluate
from schemas import records
from schemas.config import METRICS, build_config, load_config
from schemas.errors import ShowtellError
from schemas.layout import BEST_FILE, EVAL_HTML_FILE, EVAL_REPORT_FILE, WEIGHTS_FILE
from schemas.tfrecord import write_records
from schemas.vocabulary import parse_word_counts
from tests.browser import pixel_spread, screenshot
from tests.captioning import WORD_COUNTS
from tests.test_coco_metrics import direct_scores

OTHER_VOCABULARY = parse_word_counts(WORD_COUNTS).id  # not the sample data's


def make_train_dir(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_lists_finals_and_kept_checkpoints_by_phase_then_step(tmp_path):
    make_train_dir(
        tmp_path,
        {
            "phase1/checkpoint_000000200/model.weights.h5": "",
            "phase1/checkpoint_000000100/model.weights.h5": "",
            "phase1/final/state.json": json.dumps({"step": 200}),
            "phase1/checkpoint_manager_snapshot.json": "{}",  # not a checkpoint
            "phase1/checkpoint_tmp12/x": "",  # not one of Ray's kept checkpoints
            "phase2/checkpoint_000000050/model.weights.h5": "",
            "phase2/final/state.json": "not json",  # listed; fails when evaluated
        },
    )
    root = str(tmp_path)
    assert list_checkpoints(root) == [
        CheckpointRef(1, 100, INTERMEDIATE, f"{root}/phase1/checkpoint_000000100"),
        CheckpointRef(1, 200, INTERMEDIATE, f"{root}/phase1/checkpoint_000000200"),
        CheckpointRef(1, 200, FINAL, f"{root}/phase1/final"),
        CheckpointRef(2, 50, INTERMEDIATE, f"{root}/phase2/checkpoint_000000050"),
        CheckpointRef(2, None, FINAL, f"{root}/phase2/final"),
    ]
    assert [ref.kind for ref in list_checkpoints(root, "final")] == [FINAL, FINAL]
    assert list_checkpoints(str(tmp_path / "nothing")) == []


def test_lists_checkpoints_at_a_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/evaltest/train/phase1/checkpoint_000000100/model.weights.h5", b"")
    fs.pipe("/evaltest/train/phase1/final/state.json", b'{"step": 100}')
    try:
        refs = list_checkpoints("memory://evaltest/train")
    finally:
        fs.rm("/evaltest", recursive=True)
    assert [(r.phase, r.step, r.kind, r.url) for r in refs] == [
        (1, 100, INTERMEDIATE, "memory://evaltest/train/phase1/checkpoint_000000100"),
        (1, 100, FINAL, "memory://evaltest/train/phase1/final"),
    ]


def write_shard(path, examples) -> None:
    with open(path, "wb") as handle:
        serialized = (
            records.encode_sequence_example(i, jpeg, tokens, range(len(tokens))) for i, jpeg, tokens in examples
        )
        write_records(handle, serialized)


def test_references_are_raw_tokens_and_images_stream_once_each(tmp_path):
    caption = ["<S>", "a", "red", "circle", ".", "</S>"]
    write_shard(
        tmp_path / "test-00000-of-00002", [(7, b"seven", caption), (3, b"three", caption), (7, b"seven", caption)]
    )
    write_shard(tmp_path / "test-00001-of-00002", [(5, b"five", caption), (3, b"three", caption)])
    files = [str(tmp_path / "test-00000-of-00002"), str(tmp_path / "test-00001-of-00002")]

    serialized = records.encode_sequence_example(7, b"x", caption, range(6))
    assert reference_of(serialized) == (7, "a red circle .")
    assert list(split_images(files)) == [(7, b"seven"), (3, b"three"), (5, b"five")]
    assert list(split_images(files, limit=2)) == [(7, b"seven"), (3, b"three")]


def test_the_blind_image_is_a_uniform_grey_jpeg():
    image = Image.open(io.BytesIO(blank_jpeg(64)))
    assert image.format == "JPEG" and image.size == (64, 64)
    low, high = image.convert("L").getextrema()
    assert 120 <= low <= high <= 136


def test_refuses_spice_unasked_and_a_run_without_data_checkpoints_or_java(tmp_path, monkeypatch):
    config = build_config({"run_root": str(tmp_path)})
    with pytest.raises(ShowtellError, match="eval.select_by is SPICE, which is only computed with eval.spice: true"):
        plan_from_config(
            build_config({"run_root": str(tmp_path), "eval": {"select_by": "SPICE"}}), str(tmp_path / "out")
        )
    with pytest.raises(ShowtellError, match="no preprocessed data .*run `showtell preprocess` first"):
        plan_from_config(config, str(tmp_path / "out"))

    report = {"splits": {split: {"records_written": 5 if split != "test" else 0} for split in ("train", "val", "test")}}
    make_train_dir(tmp_path, {"data/preprocess_report.json": json.dumps(report)})
    with pytest.raises(ShowtellError, match="the test split has no records"):
        plan_from_config(config, str(tmp_path / "out"))

    report["splits"]["test"]["records_written"] = 5
    make_train_dir(tmp_path, {"data/preprocess_report.json": json.dumps(report)})
    with pytest.raises(ShowtellError, match="no checkpoints under .*run `showtell train --phase 1` first"):
        plan_from_config(config, str(tmp_path / "out"))

    make_train_dir(tmp_path, {"train/phase1/final/state.json": "{}"})
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ShowtellError, match="need Java"):
        plan_from_config(config, str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# The pipeline on the demo's trained run (slow)


def meteor_and_tokenizer_pids() -> set[int]:
    """Java processes of pycocoevalcap (METEOR, the CoreNLP tokenizer) running now."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    cmdline = handle.read()
            except OSError:
                continue
            if b"meteor-1.5.jar" in cmdline or b"stanford-corenlp" in cmdline:
                pids.add(int(entry))
    return pids


@pytest.fixture(scope="module")
def evaluated(demo_run, tmp_path_factory):
    """`showtell evaluate` on a copy of the demo's run in which two of phase 1's kept checkpoints
    are bad: the second's weights file is truncated (does not load), the third holds the first's
    weights (loads, but not the weights its state.json names). Which steps those are follows from
    the demo's config (checkpoint_every, checkpoints_kept)."""
    root = tmp_path_factory.mktemp("evaluate") / "run"
    root.mkdir()
    (root / "data").symlink_to(demo_run.run_root / "data")
    shutil.copytree(demo_run.run_root / "train", root / "train", ignore=shutil.ignore_patterns("tensorboard"))
    listed = list_checkpoints(str(root / "train"))
    kept = [c for c in listed if c.phase == 1 and c.kind == INTERMEDIATE]
    assert len(kept) >= 3, f"the demo keeps {len(kept)} phase 1 checkpoints; this fixture spoils two of three"
    first, truncated, swapped = kept[:3]
    weights = {c: Path(c.url) / WEIGHTS_FILE for c in (first, truncated, swapped)}
    weights[truncated].write_bytes(weights[truncated].read_bytes()[: weights[truncated].stat().st_size // 2])
    shutil.copy(weights[first], weights[swapped])

    java_before = meteor_and_tokenizer_pids()
    from orchestration.cli import main as cli_main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(["evaluate", "--config", demo_run.config_path, "--set", f"run_root={root}"])
    assert code == 0
    return {
        "root": root,
        "stdout": stdout.getvalue(),
        "report": json.loads((root / "eval" / EVAL_REPORT_FILE).read_text()),
        "listed": listed,
        "truncated_step": truncated.step,
        "swapped_step": swapped.step,
        "java_before": java_before,
    }


def entry(report: dict, phase: int, kind: str, step: int | None = None) -> dict:
    return next(
        c
        for c in report["checkpoints"]
        if c["phase"] == phase and c["kind"] == kind and (step is None or c["step"] == step)
    )


@pytest.mark.slow
def test_writes_report_html_and_best_and_reports_bad_checkpoints(evaluated):
    root, report = evaluated["root"], evaluated["report"]
    assert sorted(p.name for p in (root / "eval").iterdir()) == sorted([BEST_FILE, EVAL_REPORT_FILE, EVAL_HTML_FILE])
    assert not [p for p in root.iterdir() if p.name.startswith("eval.staging")]

    # Every collected checkpoint is in the report: both finals and every kept one.
    assert [(c["phase"], c["step"], c["kind"]) for c in report["checkpoints"]] == [
        (r.phase, r.step, r.kind) for r in evaluated["listed"]
    ]
    kinds = {(c["phase"], c["kind"]) for c in report["checkpoints"]}
    assert kinds == {(1, FINAL), (2, FINAL), (1, INTERMEDIATE), (2, INTERMEDIATE)}
    failed = {c["step"]: c["error"] for c in report["checkpoints"] if c["status"] == "failed"}
    truncated, swapped = evaluated["truncated_step"], evaluated["swapped_step"]
    assert set(failed) == {truncated, swapped} and all(
        c["phase"] == 1 for c in report["checkpoints"] if c["status"] == "failed"
    )
    assert "truncated" in failed[truncated].lower() or "unable to" in failed[truncated].lower(), failed[truncated]
    assert "do not match the fingerprint" in failed[swapped]
    assert report["counts"] == {
        "checkpoints": len(evaluated["listed"]),
        "ok": len(evaluated["listed"]) - 2,
        "failed": 2,
    }

    test_images = {i for i, _ in split_images(records_files(root))}
    for c in report["checkpoints"]:
        if c["status"] != "ok":
            continue
        assert list(c["metrics"]) == [m for m in METRICS if m != "SPICE"]
        assert 1 < c["perplexity"] < 100
        assert {x["image_id"] for x in c["captions"]} == test_images and report["images"] == len(test_images)
        assert all(len(x["references"]) == 5 and 0 < x["p"] <= 1 and x["caption"] for x in c["captions"])
        assert c["blind"]["caption"] and set(c["blind"]["metrics"]) == set(c["metrics"])

    best = json.loads((root / "eval" / BEST_FILE).read_text())
    assert best == report["best"] and best["select_by"] == "CIDEr"
    ok = [c for c in report["checkpoints"] if c["status"] == "ok"]
    assert best["value"] == max(c["metrics"]["CIDEr"] for c in ok)
    assert (
        entry(report, best["checkpoint"]["phase"], best["checkpoint"]["kind"], best["checkpoint"]["step"])["status"]
        == "ok"
    )

    page = (root / "eval" / EVAL_HTML_FILE).read_text()
    assert page.count("<img ") == min(report["eval"]["report_images"], report["images"])
    assert page.count("<svg ") == len(METRICS) - 1 + 1  # a chart per metric (no SPICE) and perplexity

    # What the CLI (and so `make demo`) prints: the report's path, the table, three samples.
    out = evaluated["stdout"]
    assert f"{root}/eval/report.json" in out and "perplexity" in out and "CIDEr" in out
    assert out.count("FAILED:") == 2 and out.count("<- best") == 1
    assert sum(line.strip().startswith("image ") for line in out.splitlines()) == 3


def records_files(root) -> list[str]:
    return sorted(str(p) for p in (root / "data").iterdir() if p.name.startswith("test-"))


@pytest.mark.slow
def test_metrics_are_pycocoevalcaps_on_the_same_captions(evaluated):
    report = evaluated["report"]
    checked = [entry(report, 1, FINAL), entry(report, 2, FINAL)]
    references = {x["image_id"]: x["references"] for x in checked[0]["captions"]}
    candidate_sets = [{x["image_id"]: x["caption"] for x in c["captions"]} for c in checked]
    candidate_sets.append({image_id: checked[1]["blind"]["caption"] for image_id in references})
    direct = direct_scores(references, *candidate_sets)
    for c, scores in zip(checked, direct):
        assert c["metrics"] == pytest.approx(scores, abs=1e-9), c["url"]
    assert checked[1]["blind"]["metrics"] == pytest.approx(direct[2], abs=1e-9)


@pytest.mark.slow
def test_trained_model_beats_a_blind_baseline(evaluated, demo_run):
    """The demo's trained model (phase 2's final) captions the test images; fed a blank image
    for every one of them instead, it must score a third of that CIDEr or less."""
    from inference.captioner import load_captioner

    report = evaluated["report"]
    final = entry(report, 2, FINAL)
    references = {x["image_id"]: x["references"] for x in final["captions"]}
    # The baseline computed here from scratch, not taken from the report.
    grey = io.BytesIO()
    size = demo_run.config.model.image_size
    Image.new("RGB", (size, size), (128, 128, 128)).save(grey, format="JPEG")
    captioner = load_captioner(str(demo_run.run_root / "train" / "phase2" / "final"))
    blind_caption = captioner.caption([grey.getvalue()])[0][0][0]
    (blind,) = direct_scores(references, {image_id: blind_caption for image_id in references})

    assert blind["CIDEr"] == pytest.approx(final["blind"]["metrics"]["CIDEr"], abs=1e-6)
    assert final["metrics"]["CIDEr"] >= 3 * blind["CIDEr"], (final["metrics"]["CIDEr"], blind["CIDEr"], blind_caption)


@pytest.mark.slow
def test_no_java_process_outlives_the_evaluation(evaluated):
    assert meteor_and_tokenizer_pids() - evaluated["java_before"] == set()


@pytest.mark.slow
def test_report_html_renders_in_a_headless_browser_with_no_console_errors(evaluated, tmp_path):
    shot = screenshot((evaluated["root"] / "eval" / EVAL_HTML_FILE).as_uri(), tmp_path / "report.png")

    assert Image.open(tmp_path / "report.png").format == "PNG" and shot.image.size == (1200, 1600)
    colours = shot.image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500  # text, charts and photos, not a blank page
    assert pixel_spread(shot.image) > 20  # not one colour: a blank page's spread is about 0
    assert shot.console == []  # no JavaScript error, nor anything else, logged by the page


@pytest.mark.slow
def test_no_loadable_checkpoint_is_an_error_after_the_report_is_written(demo_run, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    (root / "data").symlink_to(demo_run.run_root / "data")
    make_train_dir(
        root,
        {
            "train/phase1/checkpoint_000000100/model.weights.h5": "garbage",
            "train/phase1/checkpoint_000000100/state.json": json.dumps({"step": 100, "fingerprint": "x"}),
        },
    )
    config = load_config(demo_run.config_path, [f"run_root={root}", "beam.direct_running_mode=in_memory"])
    with pytest.raises(ShowtellError, match="no checkpoint could be evaluated .*checkpoint_000000100"):
        run_evaluate(config)
    report = json.loads((root / "eval" / EVAL_REPORT_FILE).read_text())
    assert report["counts"] == {"checkpoints": 1, "ok": 0, "failed": 1} and report["best"] is None
    assert not (root / "eval" / BEST_FILE).exists()


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory):
    """A tiny preprocessed sample (2 test images) and four kept phase 1 checkpoints: two of untrained
    weights, one without its weights file (it fails to load), one whose state.json names another
    vocabulary; and a phase 1 final/ of another vocabulary (tests/captioning.py's tiny model)."""
    from pipelines.preprocess import run_preprocess
    from pipelines.sample_data import generate_sample_data
    from tests.captioning import publish_tiny_final
    from trainer import checkpoints as ckpt

    root = tmp_path_factory.mktemp("untrained") / "run"
    generate_sample_data(str(root / "raw"), train_images=20, val_images=20, seed=0, image_size=64)
    model = {"encoder": "mobilenet_v3_small", "image_size": 64, "encoder_weights": "none"}
    config = build_config(
        {
            "run_root": str(root),
            "model": {**model, "embedding_size": 16, "num_lstm_units": 16},
            "data": {"shards": {"train": 1, "val": 1, "test": 1}},
            "beam": {"direct_num_workers": 2},
            "eval": {"batch_size": 1, "beam_size": 2, "max_caption_length": 5, "report_images": 1},
        }
    )
    run_preprocess(config)
    untrained = ckpt.build_inference_model(config.model, (root / "data" / "word_counts.txt").read_text())
    state = {"fingerprint": ckpt.weights_fingerprint(untrained)}
    for step in (1, 2, 3, 4):
        folder = root / "train" / "phase1" / f"checkpoint_{step:09d}"
        folder.mkdir(parents=True)
        if step != 3:
            untrained.save_weights(str(folder / WEIGHTS_FILE))
        other = {"vocabulary_id": OTHER_VOCABULARY} if step == 4 else {}
        (folder / "state.json").write_text(json.dumps({**state, **other, "step": step}))
    publish_tiny_final(root)  # train/phase1/final, over OTHER_VOCABULARY
    return config


@pytest.fixture(scope="module")
def untrained_evaluated(untrained_run):
    """`run_evaluate` on the untrained run: its report, and what the progress display printed."""
    from schemas import progress

    display = io.StringIO()
    progress.configure(display, bar=False, every=60.0)
    try:
        report = run_evaluate(untrained_run)
    finally:
        progress.configure(None, bar=False)
    return report, display.getvalue()


@pytest.mark.slow
def test_progress_shows_checkpoints_evaluated_of_all_and_the_images_captioned(untrained_evaluated):
    line = untrained_evaluated[1].splitlines()[-1]  # the line the display closed with
    assert " evaluate: 5/5 checkpoints (100%), " in line  # those that failed count too
    assert re.search(r"; checkpoint phase 1 intermediate step [12], images 2/2$", line), line


@pytest.mark.slow
def test_a_checkpoint_of_another_vocabulary_than_the_datas_fails_alone_naming_both_ids(
    untrained_run, untrained_evaluated
):
    report = untrained_evaluated[0]
    data = json.loads((Path(untrained_run.data_dir) / "preprocess_report.json").read_text())["vocabulary"]["id"]
    train = Path(untrained_run.train_dir) / "phase1"
    failed = {c["url"]: c["error"] for c in report["checkpoints"] if c["status"] == "failed"}

    assert report["counts"] == {"checkpoints": 5, "ok": 2, "failed": 3}
    assert [c["step"] for c in report["checkpoints"] if c["status"] == "ok"] == [1, 2]
    assert failed[str(train / "final")] == (
        f"ShowtellError: checkpoint {train / 'final'} was trained on vocabulary {OTHER_VOCABULARY}, not on the "
        f"data's {data} (the word ids of its records): evaluate it on the data it was trained on"
    )
    kept = train / "checkpoint_000000004"
    assert failed[str(kept)] == (
        f"ShowtellError: checkpoint {kept} was trained on vocabulary {OTHER_VOCABULARY}, not on {data} (the "
        "word_counts.txt it is loaded with): use it with the word_counts.txt of the data it was trained on"
    )


def test_the_datas_vocabulary_is_the_preprocess_reports_else_its_word_counts(tmp_path):
    config = build_config({"run_root": str(tmp_path)})
    split = {"records_written": 5, "images": {"written": 1}}
    word_counts = "a 9\n<S> 7\n</S> 7\n"
    make_train_dir(
        tmp_path,
        {"data/test-00000-of-00001": "", "data/word_counts.txt": word_counts, "train/phase1/final/state.json": "{}"},
    )
    plans = []
    for vocabulary in ({}, {"vocabulary": {"id": "3f1c0d5e9a7b2468"}}):  # preprocessed before it was recorded, after
        report = {"splits": {name: split for name in ("train", "val", "test")}, **vocabulary}
        make_train_dir(tmp_path, {"data/preprocess_report.json": json.dumps(report)})
        plans.append(plan_from_config(config, str(tmp_path / "out")))

    assert [plan.vocabulary_id for plan in plans] == [parse_word_counts(word_counts).id, "3f1c0d5e9a7b2468"]
