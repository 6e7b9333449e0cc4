"""A real S3 server on 127.0.0.1 for tests: moto in server mode, reached the standard AWS way.

    s3 = s3_fixture("my-bucket")  # a module's fixture: an s3fs file system on the server

    with s3_server(scratch_folder, buckets=["my-bucket"]) as fs:  # the same, for one block
        ...                            # s3:// URLs reach the server from anywhere meanwhile

The endpoint reaches every client by `AWS_ENDPOINT_URL` (s3fs/aiobotocore, boto3, pyarrow, and
child processes such as Beam's and Ray's workers, which inherit the environment), with dummy
credentials and no ~/.aws profile that could leak in.
"""
from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Iterator, Sequence

import boto3
import fsspec
import pytest
import s3fs
from moto.server import ThreadedMotoServer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def s3_server(scratch: Path, buckets: Sequence[str] = ()) -> Iterator[fsspec.AbstractFileSystem]:
    """A moto S3 server on a free port of 127.0.0.1 with empty `buckets`, and the environment
    pointing at it (restored after); yields an s3fs file system on it. `scratch`: an empty folder."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    no_aws_files = scratch / "none"  # no ~/.aws profile can leak in
    try:
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
                env.delenv(name, raising=False)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_CONFIG_FILE", str(no_aws_files))
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(no_aws_files))
            env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
            s3fs.S3FileSystem.clear_instance_cache()  # none made before this endpoint may answer
            client = boto3.client("s3")
            for bucket in buckets:
                client.create_bucket(Bucket=bucket)
            yield fsspec.filesystem("s3")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def s3_fixture(*buckets: str):
    """A module-scoped pytest fixture running `s3_server` with `buckets`, for a test module to
    bind to a name: `s3 = s3_fixture("my-bucket")`."""

    @pytest.fixture(scope="module")
    def s3(tmp_path_factory) -> Iterator[fsspec.AbstractFileSystem]:
        with s3_server(tmp_path_factory.mktemp("aws"), buckets=buckets) as fs:
            yield fs

    return s3
