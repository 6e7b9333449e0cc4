"""A real GCS server on 127.0.0.1 for tests: gcp-storage-emulator (in memory, in this process),
reached the standard Google way.

    gcs = gcs_fixture("my-bucket")  # a module's fixture: a gcsfs file system on the server

    with gcs_server(buckets=["my-bucket"]) as fs:  # the same, for one block
        ...                          # gs:// URLs reach the server from anywhere meanwhile

The endpoint reaches every client by `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage, and
child processes such as Beam's workers, which inherit the environment); showtell's pyarrow file
system (`schemas.stores.arrow_filesystem`) reads it from there too. No Google credentials are
looked for (gcsfs's `token` is `anon`), and none of the machine's can leak in.
"""
from __future__ import annotations

import contextlib
import copy
import http.server
import logging
import os
from typing import Iterator, Sequence

import fsspec
import fsspec.config
import gcp_storage_emulator.server
import gcsfs
import gcsfs.retry
import pytest
from fsspec.registry import _registry
from gcp_storage_emulator.server import create_server

from tests.s3_server import free_port


@contextlib.contextmanager
def gcs_server(buckets: Sequence[str] = ()) -> Iterator[fsspec.AbstractFileSystem]:
    """An emulated GCS server on a free port of 127.0.0.1 with empty `buckets`, and the environment
    pointing at it (restored after); yields a gcsfs file system on it."""
    port = free_port()
    with pytest.MonkeyPatch.context() as threaded:
        # The emulator's HTTPServer serves one connection at a time: a client that holds one open
        # without finishing its request stalls every other (after test_run_on_stores' SIGKILL, the
        # resumed run's workers timed out reading their checkpoint). GCS serves connections
        # concurrently, as this does.
        threaded.setattr(gcp_storage_emulator.server.server, "HTTPServer", http.server.ThreadingHTTPServer)
        server = create_server("127.0.0.1", port, in_memory=True)
        server.start()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)  # a line per request otherwise
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
            env.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/no-credentials.json")
            env.setitem(fsspec.config.conf, "gs", {**fsspec.config.conf.get("gs", {}), "token": "anon"})
            env.setenv("FSSPEC_GS", '{"token": "anon"}')  # Beam's worker processes read it as they import fsspec
            # gcsfs's experimental ExtendedGcsFileSystem (its default since 2026.10) asks a gRPC control
            # API, which the emulator lacks, for each bucket's layout, and waits 60 s for an answer:
            # the plain GCSFileSystem here, and in child processes (read as they import gcsfs).
            env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            for protocol in ("gs", "gcs"):
                env.setitem(_registry, protocol, gcsfs.core.GCSFileSystem)
            # The emulator answers 501 Not Implemented to gcsfs's moveTo (a rename), which gcsfs
            # retries 6 times over about 30 s before it copies and deletes instead: not here.
            env.setattr(gcsfs.retry, "errs", gcsfs.retry.errs - {501, "501"})
            gcsfs.core.GCSFileSystem.clear_instance_cache()  # none made before this endpoint may answer
            fs = fsspec.filesystem("gs")
            for bucket in buckets:
                fs.mkdir(bucket)
            yield fs
    finally:
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        server.stop()


def gcs_fixture(*buckets: str):
    """A module-scoped pytest fixture running `gcs_server` with `buckets`, for a test module to
    bind to a name: `gcs = gcs_fixture("my-bucket")`."""

    @pytest.fixture(scope="module")
    def gcs() -> Iterator[fsspec.AbstractFileSystem]:
        with gcs_server(buckets=buckets) as fs:
            yield fs

    return gcs


@contextlib.contextmanager
def store_settings_restored() -> Iterator[None]:
    """What `schemas.stores.prepare` and `apply` set for the whole process (the environment,
    fsspec's configuration and registry, the settings pyarrow is built from), put back as it was
    after the block: a test's `showtell` command with a `storage` section leaks nothing."""
    from schemas import stores

    env, conf, registry, applied = dict(os.environ), copy.deepcopy(fsspec.config.conf), dict(_registry), stores._applied
    try:
        yield
    finally:
        for name in set(os.environ) - set(env):
            del os.environ[name]
        os.environ.update(env)
        fsspec.config.conf.clear()
        fsspec.config.conf.update(conf)
        _registry.clear()
        _registry.update(registry)
        stores._applied = applied
