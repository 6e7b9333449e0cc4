"""schemas/storage.py: the one folder swap, and `publish_dir`, the one way every stage publishes a
folder (data/, final/, eval/, an export, a promoted model), on a local disk and on memory://."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

import fsspec
import pytest

from schemas.storage import publish_dir, read_text, replace_dir, write_text


def _tree(url: str) -> dict[str, str]:
    fs, root = fsspec.core.url_to_fs(url)
    return {path[len(root.rstrip("/")) + 1 :]: fs.cat_file(path).decode() for path in fs.find(root)}


@pytest.fixture(params=["local", "memory"])
def base(request, tmp_path) -> str:
    return str(tmp_path) if request.param == "local" else f"memory://storage-{uuid.uuid4().hex}"


def test_replace_dir_swaps_a_whole_nested_folder_and_drops_the_old_one(base):
    for name, text in {"old.txt": "old", "marker.json": "{}"}.items():
        write_text(f"{base}/dest/{name}", text)
    for name, text in {"a.txt": "a", "sub/b.txt": "b", "marker.json": "new"}.items():
        write_text(f"{base}/staging/{name}", text)

    replace_dir(f"{base}/staging", f"{base}/dest", marker="marker.json")

    assert _tree(f"{base}/dest") == {"a.txt": "a", "sub/b.txt": "b", "marker.json": "new"}
    assert read_text(f"{base}/dest/marker.json") == "new"


def test_replace_dir_creates_dest_when_there_is_none(base):
    write_text(f"{base}/staging/x.txt", "x")

    replace_dir(f"{base}/staging", f"{base}/dest")

    assert _tree(f"{base}/dest") == {"x.txt": "x"}


# --- publish_dir: the one way a folder is published --------------------------------------------


def _staging_left(base: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(base)
    return [path for path in fs.ls(root, detail=False) if ".staging-" in path]


def test_publish_dir_puts_the_new_folder_in_place_whole_and_leaves_no_staging(base):
    write_text(f"{base}/dest/old.txt", "old")

    with publish_dir(f"{base}/dest", marker="marker.json") as staging:
        assert staging != f"{base}/dest" and not _tree(staging)
        write_text(f"{staging}/a.txt", "a")
        write_text(f"{staging}/marker.json", "{}")

    assert _tree(f"{base}/dest") == {"a.txt": "a", "marker.json": "{}"}
    assert _staging_left(base) == []


def test_publish_dir_that_raises_in_the_middle_keeps_the_old_folder_and_leaves_no_staging(base):
    write_text(f"{base}/dest/old.txt", "old")

    with pytest.raises(RuntimeError, match="half way"):
        with publish_dir(f"{base}/dest", marker="marker.json") as staging:
            write_text(f"{staging}/a.txt", "a")
            raise RuntimeError("half way")

    assert _tree(f"{base}/dest") == {"old.txt": "old"}
    assert _staging_left(base) == []


def test_publish_dir_killed_in_the_middle_keeps_the_old_folder(tmp_path):
    """SIGKILL runs no cleanup: the old folder must still be whole, and the next publish works."""
    write_text(str(tmp_path / "dest" / "old.txt"), "old")
    writer = textwrap.dedent(
        f"""
        import time
        from schemas.storage import publish_dir, write_text
        with publish_dir({str(tmp_path / "dest")!r}, marker="marker.json") as staging:
            write_text(staging + "/a.txt", "a")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)

    assert process.returncode == -signal.SIGKILL
    assert _tree(str(tmp_path / "dest")) == {"old.txt": "old"}
    with publish_dir(str(tmp_path / "dest")) as staging:
        write_text(f"{staging}/new.txt", "new")
    assert _tree(str(tmp_path / "dest")) == {"new.txt": "new"}
