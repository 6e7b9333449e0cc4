"""`showtell caption-batch` (pipelines/caption_batch.py): a real Beam pipeline on RunInference
captions a folder, a zip, a list of URLs and an S3 glob with the tiny export, one JSONL line per
image in input order; bad images become error lines with their reasons and the run goes on; the
same input gives the same lines; a re-run keeps the shards written and captions only the rest."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from inference.captioner import load_captioner
from orchestration.cli import main as cli_main
from pipelines.caption_batch import JOB_FILE, CaptionJob, run_caption_batch, shard_url
from schemas.config import Beam
from schemas.errors import ShowtellError
from tests.captioning import export_tiny, image
from tests.datasets import encode, picture
from tests.s3_server import s3_fixture

IN_MEMORY = Beam(direct_running_mode="in_memory")  # one process: the tests' pipelines are small
BUCKET = "caption-batch"
s3 = s3_fixture(BUCKET)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    return export_tiny(tmp_path_factory.mktemp("caption_batch"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 good pictures (JPEG and PNG under .jpg names) and 3 bad files, as a bucket folder holds them."""
    folder = tmp_path_factory.mktemp("photos")
    for seed in range(12):
        (folder / f"photo-{seed:02d}.jpg").write_bytes(image(seed, "PNG" if seed % 4 == 0 else "JPEG"))
    (folder / "error-page.jpg").write_bytes(b"<html><body>404 Not Found</body></html>")
    (folder / "empty.jpg").write_bytes(b"")
    whole = encode(picture(160, 7), "JPEG")
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # its header reads; its pixels don't
    return folder


def lines(output: Path, shards: int) -> list[dict]:
    return [
        json.loads(line)
        for shard in range(shards)
        for line in Path(shard_url(str(output), shard, shards)).read_text().splitlines()
    ]


def expected_line(captioner, path: str, data: bytes) -> dict:
    """What the export's caption signature says of one image, as a line holds it."""
    captions = captioner.caption([data])[0]
    return {"path": path, "captions": [{"sentence": s, "p": float(f"{p:.6g}")} for s, p in captions]}


def test_a_folder_glob_gets_one_line_per_image_in_order_with_bad_files_as_error_lines(export, photos, tmp_path):
    job = CaptionJob(model=export, input=str(photos / "*.jpg"), output=str(tmp_path / "out"), shard_size=6)

    summary = run_caption_batch(job, IN_MEMORY)

    results = lines(tmp_path / "out", 3)
    names = sorted(os.listdir(photos))
    assert [Path(result["path"]).name for result in results] == names
    errors = {Path(r["path"]).name: (r["reason"], r["error"]) for r in results if "error" in r}
    assert errors == {
        "empty.jpg": ("empty_file", "an empty file"),
        "error-page.jpg": ("not_an_image", "not an image"),
        "truncated.jpg": ("corrupt_image", "a damaged image that no decoder reads"),
    }
    captioner = load_captioner(export)
    for result in results:
        if "error" not in result:
            assert result == expected_line(captioner, result["path"], Path(result["path"]).read_bytes())
    assert summary["captioned"] == 12 and summary["failed"] == 3
    assert summary["failed_by_reason"] == {"corrupt_image": 1, "empty_file": 1, "not_an_image": 1}
    assert (summary["shards_written"], summary["shards_kept"]) == (3, 0)
    recorded = json.loads((tmp_path / "out" / JOB_FILE).read_text())
    assert recorded["images"] == 15 and recorded["summary"] == summary


def test_the_same_input_gives_the_same_lines_whatever_the_batching_and_runner_mode(export, photos, tmp_path):
    first = CaptionJob(model=export, input=str(photos), output=str(tmp_path / "a"), shard_size=8, batch_size=3)
    second = CaptionJob(model=export, input=str(photos), output=str(tmp_path / "b"), shard_size=8, batch_size=16)

    run_caption_batch(first, IN_MEMORY)
    run_caption_batch(second, Beam(direct_running_mode="multi_processing", direct_num_workers=2))

    for shard in range(2):
        a, b = (Path(shard_url(str(tmp_path / name), shard, 2)).read_bytes() for name in "ab")
        assert a == b


def test_a_rerun_keeps_the_shards_written_and_captions_only_the_missing_ones(export, photos, tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    for path in sorted(photos.glob("photo-*.jpg")):
        (bucket / path.name).write_bytes(path.read_bytes())
    job = CaptionJob(model=export, input=str(bucket / "*.jpg"), output=str(tmp_path / "out"), shard_size=4)
    run_caption_batch(job, IN_MEMORY)
    kept = Path(shard_url(job.output, 0, 3))
    before = (kept.read_bytes(), kept.stat().st_mtime_ns)
    # As if the first run had died before writing shards 1 and 2; and shard 0's first photo is
    # damaged since: a re-run that captioned it again would write an error line for it.
    for shard in (1, 2):
        Path(shard_url(job.output, shard, 3)).unlink()
    (bucket / "photo-00.jpg").write_bytes(b"damaged")

    summary = run_caption_batch(job, IN_MEMORY)

    assert (kept.read_bytes(), kept.stat().st_mtime_ns) == before
    assert (summary["shards_written"], summary["shards_kept"]) == (2, 1)
    assert summary["captioned"] == 12 and summary["failed"] == 0


def test_an_output_that_holds_another_jobs_captions_is_refused_naming_what_differs(export, photos, tmp_path):
    output = str(tmp_path / "out")
    run_caption_batch(CaptionJob(model=export, input=str(photos / "photo-0*.jpg"), output=output), IN_MEMORY)

    with pytest.raises(ShowtellError, match=r"another job \(other input listing: it listed 10 images of "):
        run_caption_batch(CaptionJob(model=export, input=str(photos / "*.jpg"), output=output), IN_MEMORY)
    with pytest.raises(ShowtellError, match=r"another job \(other shard_size\)"):
        run_caption_batch(
            CaptionJob(model=export, input=str(photos / "photo-0*.jpg"), output=output, shard_size=3), IN_MEMORY
        )


def test_a_zip_and_a_list_of_urls_are_inputs_and_unreadable_or_oversized_files_are_error_lines(
    export, photos, tmp_path
):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in ("photo-01.jpg", "photo-02.jpg", "error-page.jpg"):
            zipped.write(photos / name, f"album/{name}")
    big = tmp_path / "big.png"
    big.write_bytes(encode(picture(300, 1), "PNG"))
    listing = tmp_path / "todo.txt"
    listing.write_text(f"# photos to caption\n{photos / 'photo-03.jpg'}\n\n{tmp_path / 'gone.jpg'}\n{big}\n")

    from_zip = run_caption_batch(CaptionJob(model=export, input=str(archive), output=str(tmp_path / "z")), IN_MEMORY)
    from_list = run_caption_batch(
        CaptionJob(model=export, input=str(listing), output=str(tmp_path / "l"), max_image_bytes=100_000), IN_MEMORY
    )

    zipped_lines = lines(tmp_path / "z", 1)
    assert [r["path"] for r in zipped_lines] == [
        f"zip://album/{name}::{archive}" for name in ("error-page.jpg", "photo-01.jpg", "photo-02.jpg")
    ]
    assert zipped_lines[1] == expected_line(load_captioner(export), zipped_lines[1]["path"], image(1))
    assert (from_zip["captioned"], from_zip["failed_by_reason"]) == (2, {"not_an_image": 1})
    listed = lines(tmp_path / "l", 1)
    assert [r.get("reason") for r in listed] == [None, "unreadable", "too_large"]
    assert listed[1]["error"] == "not found"
    assert listed[2]["error"] == f"too large ({big.stat().st_size:,d} bytes, over the limit of 100,000)"
    assert (from_list["captioned"], from_list["failed"]) == (1, 2)


def test_too_many_pixels_is_an_error_line_naming_the_size(export, photos, tmp_path):
    big = tmp_path / "in" / "wide.jpg"
    big.parent.mkdir()
    big.write_bytes(encode(picture(200, 2), "JPEG"))

    run_caption_batch(
        CaptionJob(model=export, input=str(big.parent), output=str(tmp_path / "out"), max_image_pixels=10_000),
        IN_MEMORY,
    )

    (line,) = lines(tmp_path / "out", 1)
    assert line["reason"] == "too_many_pixels"
    assert line["error"] == "too many pixels (200x200, over the limit of 10,000)"


def test_an_s3_glob_is_captioned_into_an_s3_output(export, photos, s3):
    for path in sorted(photos.glob("photo-0[0-3].jpg")):
        s3.put(str(path), f"{BUCKET}/photos/2024/{path.name}")
    s3.put(str(photos / "error-page.jpg"), f"{BUCKET}/photos/error-page.jpg")
    output = f"s3://{BUCKET}/captions"

    summary = run_caption_batch(
        CaptionJob(model=export, input=f"s3://{BUCKET}/photos/**.jpg", output=output), IN_MEMORY
    )

    text = s3.cat(f"{BUCKET}/captions/captions-00000-of-00001.jsonl").decode()
    paths = [json.loads(line)["path"] for line in text.splitlines()]
    assert paths == [f"s3://{BUCKET}/photos/2024/photo-0{i}.jpg" for i in range(4)] + [
        f"s3://{BUCKET}/photos/error-page.jpg"
    ]
    assert (summary["captioned"], summary["failed"]) == (4, 1)
    assert s3.exists(f"{BUCKET}/captions/{JOB_FILE}")


def test_a_model_that_is_no_export_with_a_caption_signature_is_refused_before_any_work(export, photos, tmp_path):
    with pytest.raises(ShowtellError, match="not a `showtell export` folder"):
        run_caption_batch(CaptionJob(model=str(tmp_path), input=str(photos), output=str(tmp_path / "o")), IN_MEMORY)
    old = tmp_path / "old-export"
    old.mkdir()
    for path in Path(export).iterdir():
        if path.is_file():  # saved_model.pb and the metadata: enough to be refused on
            (old / path.name).write_bytes(path.read_bytes())
    metadata = json.loads((old / "showtell_export.json").read_text())
    del metadata["caption"]
    (old / "showtell_export.json").write_text(json.dumps(metadata))

    with pytest.raises(ShowtellError, match="an export without a caption signature; export it again"):
        run_caption_batch(CaptionJob(model=str(old), input=str(photos), output=str(tmp_path / "o")), IN_MEMORY)
    with pytest.raises(ShowtellError, match="no files to caption there"):
        run_caption_batch(CaptionJob(model=export, input=str(photos / "*.gif"), output=str(tmp_path / "o")), IN_MEMORY)
    assert not (tmp_path / "o").exists()


def test_the_cli_prints_the_counts_and_a_missing_input_is_one_line_with_exit_2(export, photos, tmp_path, capsys):
    output = tmp_path / "out"
    command = ["caption-batch", "--model", export, "--input", str(photos / "*.jpg"), "--output", str(output)]

    assert cli_main([*command, "--shard-size", "10"]) == 0  # the default runner: a worker process per core
    printed = capsys.readouterr().out
    assert cli_main(["caption-batch", "--model", export, "--input", str(tmp_path / "none"), "--output", "o"]) == 2

    assert printed.splitlines()[0] == (
        f"caption-batch: 15 images -> {output}: 12 captioned, 3 failed (1 corrupt_image, 1 empty_file, 1 not_an_image)"
    )
    assert printed.splitlines()[1].startswith("  2 shards written, 0 kept from an earlier run, in ")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"showtell caption-batch: error: --input {tmp_path / 'none'}: not found"
