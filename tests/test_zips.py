"""pipelines/zips.py: members read straight out of zip files; a damaged zip is the user's input to
replace, named in one line, not a crash."""
from __future__ import annotations

import zipfile

import pytest

from pipelines.zips import member_names, read_member
from schemas.errors import ShowtellError


def test_a_member_is_read_and_a_missing_one_is_none(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train2014/x.jpg", b"bytes of x")

    assert member_names(str(path)) == ["train2014/x.jpg"]
    assert read_member(str(path), "train2014/x.jpg") == b"bytes of x"
    assert read_member(str(path), "train2014/y.jpg") is None


def test_a_file_that_is_not_a_zip_is_a_clear_error_naming_it(tmp_path):
    path = tmp_path / "annotations_trainval2014.zip"
    path.write_bytes(b"garbage, not a zip")

    expected = rf"^{path}: not a readable zip file \(File is not a zip file\); replace it"
    with pytest.raises(ShowtellError, match=expected):
        member_names(str(path))
