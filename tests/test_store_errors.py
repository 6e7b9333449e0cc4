"""Object stores that cannot be used are one line and exit 2, before any work, from the check
every command with a config makes first (`schemas.stores.prepare`): a bucket that does not exist
or credentials the store refuses name the URL; an unreachable endpoint names the endpoint, within
`storage.connect_timeout_s`; a missing s3fs or gcsfs names the extra to install. No secret is
written into a manifest, a log or a message, and the `storage` section is in no fingerprint.
"""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import fsspec
import pytest
import yaml

from orchestration.cli import main as cli_main
from orchestration.manifest import config_values
from orchestration.steps import STEPS
from schemas import stores
from schemas.config import ConfigError, build_config
from tests.gcs_server import gcs_fixture, store_settings_restored
from tests.s3_server import free_port, s3_fixture

BUCKET = "showtell-errors"
SECRET = "wJalrXUtnFEMI-not-a-real-secret-K7MDENG"
SHARDS = {"train": 2, "val": 1, "test": 1}  # the test's AWS secret key: it must show up nowhere


s3 = s3_fixture(BUCKET)  # a moto S3 server on 127.0.0.1 with BUCKET; an s3fs file system on it


gcs = gcs_fixture(BUCKET)  # the GCS emulator on 127.0.0.1 with BUCKET; a gcsfs file system on it


@pytest.fixture(autouse=True)
def _settings_restored(s3, gcs):
    """Both servers first, their environment kept; whatever a command's `storage` section set, undone."""
    with store_settings_restored():
        yield


def _config(tmp_path: Path, run_root: str, **sections) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_root": run_root, **sections}), encoding="utf-8")
    return str(path)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_bucket_that_does_not_exist_is_one_line_naming_the_url(scheme, tmp_path, capsys):
    run_root = f"{scheme}://no-such-bucket-{tmp_path.name.lower()}/run"
    config = _config(tmp_path, run_root)

    assert cli_main(["-q", "download", "--config", config]) == 2

    error = _one_error_line(capsys)
    assert error.startswith(f"showtell download: error: {run_root}: bucket no-such-bucket-")
    assert "does not exist" in error


def test_credentials_the_store_refuses_are_one_line_naming_the_url_and_no_secret(s3, tmp_path, capsys, monkeypatch):
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks credentials from now on
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    run_root = f"s3://{BUCKET}/refused"

    assert cli_main(["-q", "run", "--config", _config(tmp_path, run_root)]) == 2

    error = _one_error_line(capsys)
    assert error.startswith(f"showtell run: error: {run_root}: the store refused the credentials at http://127.0.0.1:")
    assert SECRET not in error and "AKIAIOSFODNN7EXAMPLE" not in error


def test_no_credentials_at_all_is_one_line_naming_where_they_come_from(s3, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to look for

    assert cli_main(["-q", "status", "--config", _config(tmp_path, f"s3://{BUCKET}/none")]) == 2

    error = _one_error_line(capsys)
    assert f"s3://{BUCKET}/none: no usable credentials" in error and "AWS_PROFILE" in error


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_an_endpoint_that_refuses_connections_is_one_line_naming_it(store, tmp_path, capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    key = "storage.s3.endpoint_url" if store == "s3" else "storage.gcs.endpoint"
    run_root = f"{'s3' if store == 's3' else 'gs'}://{BUCKET}/run"
    started = time.monotonic()

    assert cli_main(["-q", "preprocess", "--config", _config(tmp_path, run_root), "--set", f"{key}={endpoint}"]) == 2

    error = _one_error_line(capsys)
    assert f"the {store} endpoint {endpoint} is unreachable" in error and run_root in error and key in error
    assert time.monotonic() - started < 5


@pytest.fixture
def silent_endpoint():
    """A port on 127.0.0.1 that accepts no more connections: a listening socket whose backlog is
    full, so a new connection gets no answer (as a firewalled or wrong endpoint)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    waiting = []
    try:
        for _ in range(16):  # fill the backlog: the first connection that times out proves it full
            client = socket.socket()
            client.settimeout(0.5)
            try:
                client.connect(("127.0.0.1", port))
            except socket.timeout:
                client.close()
                break
            waiting.append(client)
        else:
            pytest.skip("this kernel answered every connection to a full backlog")
        yield f"http://127.0.0.1:{port}"
    finally:
        for client in waiting:
            client.close()
        server.close()


def test_an_endpoint_that_does_not_answer_fails_within_the_configured_timeout(s3, silent_endpoint, tmp_path, capsys):
    config = _config(tmp_path, f"s3://{BUCKET}/run", storage={"s3": {"endpoint_url": silent_endpoint}})
    started = time.monotonic()

    assert cli_main(["-q", "train", "--phase", "1", "--config", config, "--set", "storage.connect_timeout_s=1"]) == 2

    assert time.monotonic() - started < 5
    error = _one_error_line(capsys)
    assert f"the s3 endpoint {silent_endpoint} is unreachable (no answer within 1 s), for s3://{BUCKET}/run" in error


@pytest.mark.parametrize(("scheme", "package", "extra"), [("s3", "s3fs", "s3"), ("gs", "gcsfs", "gcs")])
def test_a_missing_store_client_names_the_extra_to_install(scheme, package, extra, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import s3fs` fails as where it is not installed
    run_root = f"{scheme}://some-bucket/run"

    assert cli_main(["-q", "evaluate", "--config", _config(tmp_path, run_root)]) == 2

    error = _one_error_line(capsys)
    assert error == (
        f"showtell evaluate: error: {run_root} needs {package}, which is not installed: pip install 'showtell[{extra}]'"
    )


def test_an_endpoint_with_credentials_in_it_is_a_config_error_that_does_not_echo_them():
    with pytest.raises(ConfigError) as error:
        build_config({"run_root": "r", "storage": {"s3": {"endpoint_url": f"http://AKIAX:{SECRET}@127.0.0.1:9000"}}})

    assert str(error.value).startswith("config: storage.s3.endpoint_url: ")
    assert "must not carry credentials" in str(error.value) and SECRET not in str(error.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("storage.gcs.endpoint", "127.0.0.1:9023", "expected http://host:port or https://host"),
        ("storage.s3.endpoint_url", "http://minio:9000/bucket", "expected no path after the host"),
        ("storage.s3.secret_access_key", "x", "unknown key"),
        ("storage.connect_timeout_s", 0, "greater than 0"),
    ],
)
def test_bad_storage_settings_are_config_errors_naming_the_key(key, value, message):
    tree: dict = {"run_root": "r"}
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(ConfigError, match=f"^config: {key.replace('.', '[.]')}: .*{message}"):
        build_config(tree)


def test_the_storage_section_is_in_no_steps_fingerprint():
    config = build_config({"run_root": "s3://b/r", "storage": {"s3": {"endpoint_url": "http://127.0.0.1:9000"}}})
    for step in STEPS:
        keys = step.keys(config)
        assert not [key for key in keys if key.split(".")[0] == "storage"], step.name
        assert "127.0.0.1:9000" not in repr(config_values(config, keys)), step.name


@pytest.mark.slow
def test_a_run_on_s3_with_a_storage_section_writes_no_secret_anywhere(s3, tmp_path, capsys, monkeypatch):
    """The secret key is in the environment, as AWS's usual settings have it; the endpoint and
    region come from the config alone, and reach Beam's worker processes too (preprocess writes
    the shards from them). Nothing the run writes (manifest, logs, run report, the mirror, the
    records), and nothing it prints, holds the secret."""
    endpoint = stores.s3_endpoint()
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the config's endpoint alone leads to the server
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s3.invalidate_cache()
    run_root = f"s3://{BUCKET}/secrets"
    settings = {"source": "sample", "sample": {"train_images": 8, "val_images": 4}, "shards": SHARDS}
    storage = {"s3": {"endpoint_url": endpoint, "region": "us-east-1"}}
    beam = {"direct_running_mode": "multi_processing", "direct_num_workers": 2}
    config = _config(tmp_path, run_root, data=settings, storage=storage, beam=beam)

    assert cli_main(["run", "--config", config, "--until", "preprocess"]) == 0

    printed = capsys.readouterr()
    assert SECRET not in printed.out + printed.err
    fs = fsspec.filesystem("s3", endpoint_url=endpoint)
    written = fs.find(f"{BUCKET}/secrets")
    assert f"{BUCKET}/secrets/manifest.json" in written and f"{BUCKET}/secrets/logs/preprocess.log" in written
    assert f"{BUCKET}/secrets/data/train-00001-of-00002" in written
    for path in written:
        assert SECRET.encode() not in fs.cat_file(path), path
    manifest = fs.cat_file(f"{BUCKET}/secrets/manifest.json").decode()
    assert endpoint not in manifest  # where the store is, is not what the steps made
