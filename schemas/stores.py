"""Object stores (s3://, gs://): where their endpoints and credentials come from, the same for
fsspec (everything showtell reads and writes itself) and pyarrow (Ray Train's checkpoints), and
one early check that each store a run writes to answers.

Endpoints and credentials come from each store's usual settings, and the config's `storage`
section overrides them (schemas/config.py; no field there holds a secret):

    store   endpoint                                     credentials
    s3://   storage.s3.endpoint_url, AWS_ENDPOINT_URL_S3,   storage.s3.profile, AWS_PROFILE, AWS_ACCESS_KEY_ID /
            AWS_ENDPOINT_URL, else AWS (by region)          AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role
    gs://   storage.gcs.endpoint, STORAGE_EMULATOR_HOST,    Google's application default credentials; none
            else https://storage.googleapis.com             (anonymous) at an emulator, or storage.gcs.anonymous

    prepare(config)     # apply(config.storage), then check_stores(run_root, data.mirror, models_root):
                        # a missing bucket, refused credentials, an unreachable endpoint or a missing
                        # client is one line naming it, before any work
    path, filesystem = arrow_filesystem("s3://bucket/run/train")  # for RunConfig(storage_filesystem)

`apply` puts the overrides into fsspec's configuration (`fsspec.config.conf`) and exports them as
`FSSPEC_S3` / `FSSPEC_GS` (and a profile as `AWS_PROFILE`), so child processes (Beam's workers, a
local Ray cluster's) that import fsspec read the same. Only non-secret settings are exported.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import os
import socket
import urllib.parse
import urllib.request
from typing import Any, Iterable, Optional

from schemas.config import Config, Storage
from schemas.errors import ShowtellError

# fsspec protocol -> store; each store's fsspec client package and the extra that installs it.
STORES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
CLIENTS = {"s3": ("s3fs", "s3"), "gcs": ("gcsfs", "gcs")}
GOOGLE_ENDPOINT = "https://storage.googleapis.com"

_applied = Storage()  # what `apply` was last given: `arrow_filesystem` builds from it


class StoreError(ShowtellError):
    """A store that cannot be used: no client, an unreachable endpoint, a missing bucket, refused
    credentials. The message is one line naming the URL or the endpoint, and never a secret."""


def store_of(url: str) -> Optional[str]:
    """`s3` or `gcs` for an object store URL, None for anything else (a local path, memory://, http)."""
    scheme, sep, _ = url.partition("://")
    return STORES.get(scheme.lower()) if sep else None


def bucket_of(url: str) -> str:
    return url.partition("://")[2].split("/", 1)[0]


# --- where each store is --------------------------------------------------------------------


def s3_endpoint(storage: Optional[Storage] = None) -> Optional[str]:
    """The S3 endpoint in force: the config's, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; None: AWS's own."""
    storage = _applied if storage is None else storage
    return storage.s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region(storage: Optional[Storage] = None) -> Optional[str]:
    storage = _applied if storage is None else storage
    return storage.s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def gcs_endpoint(storage: Optional[Storage] = None) -> Optional[str]:
    """The GCS endpoint in force: the config's, else STORAGE_EMULATOR_HOST (as gcsfs reads it); None: Google's."""
    storage = _applied if storage is None else storage
    if storage.gcs.endpoint:
        return storage.gcs.endpoint
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator in ("", "default"):
        return None
    return emulator if emulator.startswith(("http://", "https://")) else f"http://{emulator}"


def gcs_anonymous(storage: Optional[Storage] = None) -> bool:
    """No credentials for GCS: as configured, else only at an emulator (a custom endpoint)."""
    storage = _applied if storage is None else storage
    if storage.gcs.anonymous is not None:
        return storage.gcs.anonymous
    return gcs_endpoint(storage) is not None


def endpoint(store: str, storage: Optional[Storage] = None) -> str:
    """The base URL a store's requests go to, for messages and the reachability check."""
    if store == "s3":
        region = s3_region(storage)
        default = f"https://s3.{region}.amazonaws.com" if region else "https://s3.amazonaws.com"
        return s3_endpoint(storage) or default
    return gcs_endpoint(storage) or GOOGLE_ENDPOINT


# --- applying the config ----------------------------------------------------------------------


def fsspec_options(storage: Storage) -> dict[str, dict[str, Any]]:
    """{fsspec protocol: the file system arguments the config sets}, none for settings left null
    (s3fs and gcsfs then read the usual settings themselves)."""
    s3: dict[str, Any] = {"config_kwargs": {"connect_timeout": storage.connect_timeout_s}}
    if storage.s3.endpoint_url:
        s3["endpoint_url"] = storage.s3.endpoint_url
    if storage.s3.profile:
        s3["profile"] = storage.s3.profile
    if storage.s3.region:
        s3["client_kwargs"] = {"region_name": storage.s3.region}
    gcs: dict[str, Any] = {}
    if storage.gcs.endpoint:
        gcs["endpoint_url"] = storage.gcs.endpoint
    if storage.gcs.project:
        gcs["project"] = storage.gcs.project
    if gcs_anonymous(storage):
        gcs["token"] = "anon"
    return {"s3": s3, "gs": gcs}


def apply(storage: Storage) -> None:
    """Makes `storage` the settings of every store client this process (and its children) makes
    from now on: fsspec's configuration, the environment children inherit, and `arrow_filesystem`."""
    global _applied
    import fsspec.config

    _applied = storage
    for protocol, options in fsspec_options(storage).items():
        merged = {**fsspec.config.conf.get(protocol, {}), **options}
        fsspec.config.conf[protocol] = merged
        os.environ[f"FSSPEC_{protocol.upper()}"] = json.dumps(merged)
    if storage.s3.profile:
        os.environ["AWS_PROFILE"] = storage.s3.profile  # pyarrow (the AWS SDK) reads the profile from here
    if gcs_endpoint(storage) is not None:
        _plain_gcsfs()
    _clear_instance_caches()


def _plain_gcsfs() -> None:
    """gcsfs's experimental ExtendedGcsFileSystem (its default since 2026.10) asks Google's gRPC
    control API for each bucket's layout, and waits 60 s where, as at an emulator, none answers:
    at a custom endpoint, the plain GCSFileSystem, here and in child processes."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read as gcsfs is imported
    if importlib.util.find_spec("gcsfs") is not None:
        import fsspec
        import gcsfs.core

        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


def exported_env(storage: Storage) -> dict[str, str]:
    """The environment variables `apply` sets, for processes that do not inherit this one's (a
    remote Ray cluster's workers, through their runtime_env). They hold no secret."""
    env = {f"FSSPEC_{p.upper()}": json.dumps(o) for p, o in fsspec_options(storage).items()}
    if storage.s3.profile:
        env["AWS_PROFILE"] = storage.s3.profile
    return env


def _clear_instance_caches() -> None:
    """fsspec keeps one file system per argument set; the ones made before the settings changed go."""
    import sys

    for module, name in (("s3fs", "S3FileSystem"), ("gcsfs.core", "GCSFileSystem")):
        if sys.modules.get(module) is not None:
            getattr(sys.modules[module], name).clear_instance_cache()


# --- pyarrow, for Ray Train's storage ---------------------------------------------------------


def arrow_filesystem(url: str, storage: Optional[Storage] = None) -> tuple[str, Any]:
    """(path, pyarrow file system) for an s3:// or gs:// URL, at the endpoint and with the
    credentials fsspec uses (`storage`, default: what `apply` was given, then the environment).

    Credentials are never passed in: pyarrow's S3 reads the AWS variables, profile and role, and
    its GCS Google's default credentials, as the fsspec clients do, so the file system that Ray
    pickles to its workers carries no secret.
    """
    import pyarrow.fs

    storage = _applied if storage is None else storage
    store = store_of(url)
    path = url.partition("://")[2].rstrip("/")
    if store == "s3":
        options: dict[str, Any] = {"connect_timeout": storage.connect_timeout_s}
        custom = s3_endpoint(storage)
        if custom:
            parts = urllib.parse.urlsplit(custom)
            options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
        region = s3_region(storage)
        if region:
            options["region"] = region
        return path, pyarrow.fs.S3FileSystem(**options)
    if store == "gcs":
        options = {"anonymous": gcs_anonymous(storage)}
        custom = gcs_endpoint(storage)
        if custom:
            parts = urllib.parse.urlsplit(custom)
            options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
            # An emulator that stops answering fails in seconds, not after the default 15 minutes.
            options["retry_time_limit"] = datetime.timedelta(seconds=max(60.0, 6 * storage.connect_timeout_s))
        project = storage.gcs.project or os.environ.get("GOOGLE_CLOUD_PROJECT")
        if project:
            options["project_id"] = project
        return path, pyarrow.fs.GcsFileSystem(**options)
    raise ValueError(f"{url}: not an s3:// or gs:// URL")


# --- the early check --------------------------------------------------------------------------


def prepare(config: Config) -> None:
    """What every command with a config does before it touches a store: `apply` its `storage`
    section, then `check_stores` on the folders it writes (run_root, data.mirror,
    promote.models_root), so a store that cannot be used is one line before any work starts."""
    apply(config.storage)
    check_stores([config.run_root, config.data.mirror, config.promote.models_root], config.storage)


def check_stores(urls: Iterable[Optional[str]], storage: Optional[Storage] = None) -> None:
    """Checks, once per bucket, that each object store URL among `urls` can be used: its client
    is installed, its endpoint accepts a connection within `storage.connect_timeout_s`, and its
    bucket exists and takes the credentials. Raises a StoreError naming the first that cannot;
    other URLs (local paths, memory://) pass unchecked."""
    storage = _applied if storage is None else storage
    seen: set[tuple[str, str]] = set()
    for url in urls:
        store = store_of(url or "")
        if store is None or (store, bucket_of(url)) in seen:
            continue
        seen.add((store, bucket_of(url)))
        fs = client(url)
        _reach(store, url, storage)
        _bucket_answers(fs, store, url, storage)


def client(url: str):
    """The fsspec file system of a store URL; a missing client package is a StoreError naming the extra."""
    import fsspec

    store = store_of(url)
    if store is not None:
        package, extra = CLIENTS[store]
        try:
            importlib.import_module(package)
        except ImportError:
            install = f"pip install 'showtell[{extra}]'"
            raise StoreError(f"{url} needs {package}, which is not installed: {install}") from None
    return fsspec.core.url_to_fs(url)[0]


def _setting(store: str) -> str:
    if store == "s3":
        return "storage.s3.endpoint_url or AWS_ENDPOINT_URL"
    return "storage.gcs.endpoint or STORAGE_EMULATOR_HOST"


def _reach(store: str, url: str, storage: Storage) -> None:
    """A TCP connection to the store's endpoint within the timeout (skipped where a proxy carries
    the requests: the client's own timeout applies there)."""
    base = endpoint(store, storage)
    parts = urllib.parse.urlsplit(base)
    host = parts.hostname or ""
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    timeout = storage.connect_timeout_s
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.timeout:
        why = f"no answer within {timeout:g} s"
    except OSError as error:
        why = error.strerror or type(error).__name__
    else:
        return
    raise StoreError(f"the {store} endpoint {base} is unreachable ({why}), for {url}; check {_setting(store)}")


def _bucket_answers(fs, store: str, url: str, storage: Storage) -> None:
    """The bucket of `url` exists and takes this process's credentials."""
    bucket = bucket_of(url)
    at = f" at {endpoint(store, storage)}"
    try:
        fs.invalidate_cache(bucket)
        info = fs.info(bucket)
    except FileNotFoundError:
        raise StoreError(f"{url}: bucket {bucket} does not exist{at}") from None
    except PermissionError:
        raise StoreError(f"{url}: the store refused the credentials{at} ({_credentials(store)})") from None
    except Exception as error:  # botocore's NoCredentialsError, google-auth's errors, an HTTP error
        name = type(error).__name__
        if "Credential" in name or "Auth" in name or "Forbidden" in name:
            raise StoreError(f"{url}: no usable credentials for the store{at} ({_credentials(store)})") from None
        raise StoreError(f"{url}: the store{at} failed ({name}: {_first_line(error)})") from None
    if info.get("type") != "directory":
        raise StoreError(f"{url}: bucket {bucket} does not exist{at}")


def _credentials(store: str) -> str:
    if store == "s3":
        return "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or storage.s3.profile, ~/.aws, an instance role"
    return "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`; storage.gcs.anonymous"


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else ""

