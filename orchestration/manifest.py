"""`<run_root>/manifest.json`, what `showtell run` did per step, and the fingerprints that say
whether a step is still up to date.

    {"version": 1, "run_root": "runs/local", "last_run": {"run_id", "started", "host", "pid", "command"},
     "steps": {"preprocess": {"state": "done", "run_id": "...", "start": "...", "end": "...", "seconds": 28.1,
                              "fingerprint": "<sha256>", "basis": {...}, "outputs": [...], "error": null,
                              "summary": {...}}, ...},
     "hashes": {"{run_root}/export/variables/variables.data-00000-of-00001":
                    {"stamp": "size:91234567:mtime:1733356800.25", "signature": "sha256:<hex>"}, ...}}

A step's state is `running` (set before its work starts: a killed run leaves it so), `done` or
`failed` (with the error's first line). The manifest is rewritten whole after every change of
state (`schemas.storage.write_text`: temp file + rename on a local disk, one object on a store).
`run_root` records where the manifest was first written; nothing reads it back.

A fingerprint is the SHA-256 of the JSON of a step's *basis*:

    {"config":   {dotted key: value} for the config keys the step reads,
     "inputs":   {key: signature} for the files and folders of earlier steps it reads,
     "upstream": {"step": name, "done": end time} of the step before it (None for the first)}

Nothing in a basis depends on how a location is spelled, so a run folder reached by a relative
or an absolute path, or copied to another place or another store, is up to date there as long
as its content is unchanged:

- Locations are written relative to the run (`Places`). An input under `data.mirror` is keyed
  `{data.mirror}/zips/train2014.zip`, one under run_root `{run_root}/data/word_counts.txt`; a
  config value that is a location (`LOCATION_KEYS`: `data.mirror`, `data.source`, ...) and lies
  under run_root is written `{run_root}/raw`. Other local paths are made absolute (symlinks
  resolved), URLs stay as they are. Any other string value that is an absolute path or a URL
  under run_root is written `{run_root}/...` too (a relative one may be a plain word: it is left
  as it is).
- A file's signature is the SHA-256 of its bytes, `sha256:<hex>`, whatever its size and store.
  A file up to `SMALL_FILE_BYTES` is hashed whenever it is signed. A bigger one (13 GB of MSCOCO
  zips, a model's variables) is not read again when something vouches for its hash:
  - a voucher: the download's `<file>.verified.json` sidecar, or for the sample set the entry of
    `<data.mirror>/sample.json`, when it records the file's size and is not older than the file
    (a file changed after its voucher was written is hashed);
  - else the manifest's `hashes` cache, when the file's stamp (its size and the store's content
    hash or ETag, else its modification time) is the one recorded with the hash. The cache is
    keyed like the inputs, so a copy that keeps the stamps (`cp -p`, `shutil.copytree`) uses it;
  - else the file is hashed, and the hash cached (`showtell run` saves it with the manifest;
    `showtell status` saves nothing).
- A folder's signature hashes its files' relative paths and signatures.

`upstream` makes a re-run step re-run every step after it.

A manifest written before these rules (absolute input URLs, big files signed by size and
modification time) still loads: its steps look stale once and run again.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, Optional, Sequence

import fsspec

from schemas.config import Config, join_url
from schemas.errors import ShowtellError
from schemas.storage import absolute, exists, fresh_fs, is_local, read_json, write_text

log = logging.getLogger("showtell.manifest")

MANIFEST_FILE = "manifest.json"
VERSION = 1
RUNNING, DONE, FAILED = "running", "done", "failed"
HASHES = "hashes"  # the manifest's cache of big files' hashes: {key: {"stamp", "signature"}}
SMALL_FILE_BYTES = 1 << 20  # files up to this size are hashed whenever signed; bigger ones are vouched for or cached
HASH_CHUNK_BYTES = 8 << 20  # a big file is hashed in chunks of this size
MISSING = "missing"  # the signature of an input that is not there
RUN_ROOT, MIRROR = "{run_root}", "{data.mirror}"  # how a basis writes the two places a run's files lie under
# Config keys whose values are locations, each with its values that are keywords, not locations.
LOCATION_KEYS: dict[str, tuple[str, ...]] = {
    "data.source": ("sample",),
    "data.mirror": (),
    "model.encoder_weights": ("imagenet", "none"),
    "promote.models_root": (),
    "train.init_from": ("none", "promoted"),
}
# Files that record the SHA-256 and size of a file (pipelines/download.py, pipelines/sample_data.py).
DOWNLOAD_SIDECAR_SUFFIX = ".verified.json"  # `<file>.verified.json`: {"size", "sha256", ...}
SAMPLE_STAMP_FILE = "sample.json"  # `<data.mirror>/sample.json`: {"files": {relpath: {"size", "sha256"}}}
_STORE_HASHES = ("md5Hash", "md5", "ETag", "etag")  # fs.info keys of a content hash or version tag
_STORE_TIMES = ("mtime", "LastModified", "updated", "last_modified", "created")  # modification time keys
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def now_iso() -> str:
    """The current UTC time, ISO 8601 with microseconds (manifest times, upstream tokens)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


# --- where things are -----------------------------------------------------------------------------


def normal_location(url: str) -> str:
    """One spelling of a location: a local path absolute with its symlinks resolved, a URL without
    a trailing '/'."""
    if is_local(url):
        return os.path.realpath(absolute(url))
    return url.rstrip("/") or url


def _rest_under(url: str, base: str) -> Optional[str]:
    """What follows folder `base` in `url`: "" for `base` itself, "/a/b" below it; None outside it."""
    if url == base:
        return ""
    prefix = base.rstrip("/") + "/"
    return url[len(prefix) - 1 :] if url.startswith(prefix) else None


@dataclasses.dataclass(frozen=True)
class Places:
    """The two folders a basis writes locations relative to: `{run_root}` and `{data.mirror}`.

        places = Places("runs/local", "runs/local/raw")
        places.key("/abs/runs/local/raw/zips/val2014.zip")  # "{data.mirror}/zips/val2014.zip" (cwd /abs)
        places.key("s3://b/elsewhere.txt")                   # "s3://b/elsewhere.txt"
        places.values({"data.mirror": "/abs/runs/local/raw"})  # {"data.mirror": "{run_root}/raw"}
    """

    run_root: str
    mirror: Optional[str] = None

    @classmethod
    def of(cls, config: Config) -> "Places":
        return cls(config.run_root, config.data.mirror)

    def key(self, url: str) -> str:
        """`url` relative to the innermost of the two folders it lies under, else in one spelling."""
        location = normal_location(url)
        bases = [(RUN_ROOT, normal_location(self.run_root))]
        if self.mirror:
            bases.append((MIRROR, normal_location(self.mirror)))
        for name, base in sorted(bases, key=lambda named: len(named[1]), reverse=True):
            rest = _rest_under(location, base)
            if rest is not None:
                return name + rest
        return location

    def values(self, values: dict[str, Any]) -> dict[str, Any]:
        """Config values ({dotted key: value}) with their locations written as the module's
        docstring says; other values as they are."""
        return {key: self._value(key, value) for key, value in values.items()}

    def _value(self, dotted: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: self._value(f"{dotted}.{key}", item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._value("", item) for item in value]
        if not isinstance(value, str):
            return value
        root = normal_location(self.run_root)
        if dotted in LOCATION_KEYS and value not in LOCATION_KEYS[dotted]:
            location = normal_location(value)
            rest = _rest_under(location, root)
            return location if rest is None else RUN_ROOT + rest
        # Any other string is a location when it is an absolute path or a URL; a relative one may
        # be a plain word ("test"), which made absolute would depend on the current folder.
        if os.path.isabs(value) or "://" in value:
            rest = _rest_under(normal_location(value), root)
            if rest is not None:
                return RUN_ROOT + rest
        return value


# --- signatures -----------------------------------------------------------------------------------


class Signer:
    """Signs files and folders by content (see the module's docstring). `cache` holds big files'
    hashes by key, {key: {"stamp", "signature"}} (a manifest's `hashes`); `updated` says whether
    signing added to it. Without a cache every big file without a voucher is hashed."""

    def __init__(self, cache: Optional[dict[str, dict[str, str]]] = None):
        self.cache = cache
        self.updated = False

    def sign(self, url: str, places: Optional[Places] = None) -> str:
        """The signature of the file or folder at `url`, `MISSING` when there is none. With
        `places`, the cache is keyed as `places.key` keys inputs, and the sample set's stamp in
        `places.mirror` may vouch for its files."""
        fs, path = fresh_fs(url)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return MISSING
        key = places.key(url) if places else normal_location(url)
        if info["type"] == "directory":
            root = path.rstrip("/")
            entries = fs.find(root, detail=True)
            digest = hashlib.sha256()
            for name in sorted(entries):
                rest = name[len(root) :]
                digest.update(f"{rest}={self._file(fs, name, entries[name], key + rest, places)}\n".encode())
            return f"folder:{len(entries)}:{digest.hexdigest()}"
        return self._file(fs, path, info, key, places)

    def _file(
        self, fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any], key: str, places: Optional[Places]
    ) -> str:
        size = info.get("size")
        if size is not None and size <= SMALL_FILE_BYTES:
            return "sha256:" + hashlib.sha256(fs.cat_file(path)).hexdigest()
        vouched = _vouched_hash(fs, path, info, key, places)
        if vouched is not None:
            return "sha256:" + vouched
        stamp = _stamp(info)
        cached = self.cache.get(key) if self.cache is not None else None
        if stamp is not None and isinstance(cached, dict) and cached.get("stamp") == stamp:
            return cached["signature"]
        signature = "sha256:" + _hash_file(fs, path)
        if self.cache is not None and stamp is not None:
            self.cache[key] = {"stamp": stamp, "signature": signature}
            self.updated = True
        return signature


def signature(url: str) -> str:
    """What a file or folder is now, by content: see the module's docstring. `MISSING` if absent."""
    return Signer().sign(url)


def _hash_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The hex SHA-256 of a file, read in `HASH_CHUNK_BYTES` chunks."""
    log.info("hashing %s", path)
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=HASH_CHUNK_BYTES) as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _vouched_hash(
    fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any], key: str, places: Optional[Places]
) -> Optional[str]:
    """The hex SHA-256 a voucher records for a file, or None: the download's sidecar, else the
    sample set's stamp, each only when it records the file's size and is not older than the file."""
    vouchers: list[tuple[fsspec.AbstractFileSystem, str, Callable[[dict[str, Any]], Any]]] = [
        (fs, path + DOWNLOAD_SIDECAR_SUFFIX, lambda record: record)
    ]
    if places is not None and places.mirror and key.startswith(MIRROR + "/"):
        relpath = key[len(MIRROR) + 1 :]
        stamp_fs, stamp_path = fresh_fs(join_url(places.mirror, SAMPLE_STAMP_FILE))
        vouchers.append((stamp_fs, stamp_path, lambda record: (record.get("files") or {}).get(relpath)))
    for voucher_fs, voucher_path, entry_of in vouchers:
        try:
            voucher_info = voucher_fs.info(voucher_path)
            record = json.loads(voucher_fs.cat_file(voucher_path))
        except (FileNotFoundError, ValueError):
            continue
        entry = entry_of(record) if isinstance(record, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            continue
        if not _SHA256_HEX.fullmatch(entry["sha256"]) or entry.get("size") != info.get("size"):
            continue
        written, modified = _modified(voucher_info), _modified(info)
        if written is None or modified is None or written >= modified:
            return entry["sha256"]
    return None


def _stamp(info: dict[str, Any]) -> Optional[str]:
    """What changes when a file is rewritten, from its store metadata: its size and content hash
    or version tag, else its size and modification time; None when the store tells neither."""
    for key in _STORE_HASHES:
        if info.get(key):
            return f"size:{info.get('size')}:{key}:{info[key]}"
    for key in _STORE_TIMES:
        if info.get(key) is not None:
            return f"size:{info.get('size')}:{key}:{info[key]}"
    return None


def _modified(info: dict[str, Any]) -> Optional[float]:
    """A file's modification time in seconds since the epoch, from its store metadata; None if unknown."""
    for key in _STORE_TIMES:
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


# --- fingerprints -----------------------------------------------------------------------------


def config_values(config: Config, keys: Iterable[str]) -> dict[str, Any]:
    """{dotted key: its value in `config` (a section as a dict)}; a key the schema lacks is a bug."""
    tree = config.model_dump(mode="json")
    values = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"{key}: not a config key")
            node = node[part]
        values[key] = node
    return values


def make_basis(
    values: dict[str, Any],
    inputs: Sequence[str],
    upstream: Optional[dict[str, str]],
    places: Places,
    signer: Optional[Signer] = None,
) -> dict[str, Any]:
    """A step's basis from its config values and its input URLs, written relative to `places`,
    the inputs signed now by `signer` (a fresh one, caching nothing, by default), and its upstream
    token."""
    signer = signer or Signer()
    return {
        "config": places.values(values),
        "inputs": {places.key(url): signer.sign(url, places) for url in inputs},
        "upstream": upstream,
    }


def fingerprint(basis: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def describe_change(old: Optional[dict[str, Any]], new: dict[str, Any], base: str = "", limit: int = 3) -> str:
    """What differs between two bases, for a log line, config first: `config train.phase2.steps
    4 -> 6`, `preprocess re-ran`, `input eval/best.json changed` (an input under run_root named
    relative to it, as one under `base`; one under the mirror as `{data.mirror}/zips/...`)."""
    if not old:
        return "no earlier run recorded"
    changes = []
    old_config, new_config = _flatten(old.get("config", {})), _flatten(new["config"])
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key, MISSING) != new_config.get(key, MISSING):
            changes.append(f"config {key} {old_config.get(key, MISSING)!r} -> {new_config.get(key, MISSING)!r}")
    upstream = new["upstream"]
    if upstream and old.get("upstream") != upstream:
        changes.append(f"{upstream['step']} {'re-ran' if upstream['done'] else 'is not done'}")
    old_inputs = old.get("inputs", {})
    if _placed(new["inputs"]) and old_inputs and not _placed(old_inputs):
        changes.append("its inputs were recorded by path, as an older showtell did")
    else:
        for key, sig in new["inputs"].items():
            if old_inputs.get(key) != sig:
                what = "is missing" if sig == MISSING else "changed" if key in old_inputs else "is new"
                changes.append(f"input {relative(relative(key, RUN_ROOT), base)} {what}")
    if not changes:
        return "its inputs are listed differently"
    more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


def _placed(inputs: dict[str, Any]) -> bool:
    """Whether some of a basis's inputs are keyed relative to a place (`{run_root}/...`): those of
    a showtell before `Places` never are."""
    return any(key.startswith((RUN_ROOT, MIRROR)) for key in inputs)


def only_grown(old: Optional[dict[str, Any]], new: dict[str, Any], leaves: Sequence[str]) -> bool:
    """Whether the only difference between two bases is that some of the config `leaves` (dotted
    keys of numbers) grew: a step may then go on from its earlier attempt, e.g. a phase trained to
    more steps goes on from its last checkpoint instead of starting again."""
    if not old or not leaves or old.get("inputs") != new["inputs"] or old.get("upstream") != new["upstream"]:
        return False
    old_config, new_config = _flatten(old.get("config", {})), _flatten(new["config"])
    changed = {key for key in set(old_config) | set(new_config) if old_config.get(key) != new_config.get(key)}
    return bool(changed) and changed <= set(leaves) and all(
        isinstance(old_config.get(key), (int, float)) and new_config.get(key) > old_config[key] for key in changed
    )


def relative(url: str, base: str) -> str:
    """`url` relative to folder `base` when it lies under it (shorter log lines), else as it is."""
    prefix = base.rstrip("/") + "/"
    return url[len(prefix) :] if base and url.startswith(prefix) else url


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, so a changed section names the leaf that changed."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def missing(urls: Iterable[str]) -> list[str]:
    """The URLs in `urls` that do not exist."""
    return [url for url in urls if not exists(url)]


# --- the manifest -----------------------------------------------------------------------------


class Manifest:
    """The manifest of one run root, read once and rewritten on every change."""

    def __init__(self, url: str, data: dict[str, Any], guard: Optional[Callable[[], None]] = None):
        self.url, self.data, self.guard = url, data, guard
        # Signs inputs for `assess`, caching big files' hashes in the manifest (saved with it).
        self.signer = Signer(data.setdefault(HASHES, {}))

    @classmethod
    def load(cls, run_root: str, guard: Optional[Callable[[], None]] = None) -> "Manifest":
        """The run root's manifest, or an empty one when there is none yet. `guard` is called
        before every save and raises to prevent it (e.g. `FolderLock.check`: a run that lost its
        lock must not overwrite the manifest of the run that took it)."""
        url = join_url(run_root, MANIFEST_FILE)
        try:
            data = read_json(url)
        except ValueError:
            raise ShowtellError(
                f"{url}: not valid JSON; fix it, or remove it to have every step run again"
            ) from None
        if data is None:
            data = {"version": VERSION, "run_root": run_root, "steps": {}}
        if data.get("version") != VERSION:
            raise ShowtellError(f"{url}: manifest version {data.get('version')!r}, this showtell writes {VERSION}")
        return cls(url, data, guard)

    def step(self, name: str) -> Optional[dict[str, Any]]:
        """The record of step `name`, or None if it never started."""
        return self.data["steps"].get(name)

    def set_step(self, name: str, record: dict[str, Any]) -> None:
        """Replaces step `name`'s record and saves."""
        self.data["steps"][name] = record
        self.save()

    def set_run(self, info: dict[str, Any]) -> None:
        """Records the run now holding the run root (`last_run`) and saves."""
        self.data["last_run"] = info
        self.save()

    def save(self) -> None:
        if self.guard is not None:
            self.guard()
        write_text(self.url, json.dumps(self.data, indent=1) + "\n")
        self.signer.updated = False


def upstream_token(name: str, record: Optional[dict[str, Any]]) -> Optional[dict[str, str]]:
    """The `upstream` part of the next step's basis: this step's name and when it was last done."""
    done = record["end"] if record and record.get("state") == DONE else None
    return {"step": name, "done": done}
