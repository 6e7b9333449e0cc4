"""schemas/storage.py: the one folder swap that publishes both data/ and final/."""
from __future__ import annotations

import uuid

import fsspec
import pytest

from schemas.storage import read_text, replace_dir, write_text


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
