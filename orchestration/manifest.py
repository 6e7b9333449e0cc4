"""`<run_root>/manifest.json`, what `showtell run` did per step, and the fingerprints that say
whether a step is still up to date.

    {"version": 1, "run_root": "runs/local", "last_run": {"run_id", "started", "host", "pid", "command"},
     "steps": {"preprocess": {"state": "done", "run_id": "...", "start": "...", "end": "...", "seconds": 28.1,
                              "fingerprint": "<sha256>", "basis": {...}, "outputs": [...], "error": null,
                              "summary": {...}}, ...}}

A step's state is `running` (set before its work starts: a killed run leaves it so), `done` or
`failed` (with the error's first line). The manifest is rewritten whole after every change of
state (`schemas.storage.write_text`: temp file + rename on a local disk, one object on a store).

A fingerprint is the SHA-256 of the JSON of a step's *basis*:

    {"config":   {dotted key: value} for the config keys the step reads,
     "inputs":   {url: signature} for the files and folders of earlier steps it reads,
     "upstream": {"step": name, "done": end time} of the step before it (None for the first)}

A small file's signature is its SHA-256 (`SMALL_FILE_BYTES`); a big file's is the store's MD5 or
ETag where it has one, else its size and modification time; a folder's hashes the signatures of
all its files by relative path. `upstream` makes a re-run step re-run every step after it.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
from typing import Any, Callable, Iterable, Optional, Sequence

import fsspec

from schemas.config import Config, join_url
from schemas.errors import ShowtellError
from schemas.storage import exists, read_json, write_text

log = logging.getLogger("showtell.manifest")

MANIFEST_FILE = "manifest.json"
VERSION = 1
RUNNING, DONE, FAILED = "running", "done", "failed"
SMALL_FILE_BYTES = 1 << 20  # files up to this size are hashed; bigger ones are signed by store metadata
MISSING = "missing"  # the signature of an input that is not there
_STORE_HASHES = ("md5Hash", "md5", "ETag", "etag")  # fs.info keys of a content hash or version tag
_STORE_TIMES = ("mtime", "LastModified", "updated", "last_modified", "created")  # modification time keys


def now_iso() -> str:
    """The current UTC time, ISO 8601 with microseconds (manifest times, upstream tokens)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


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


def signature(url: str) -> str:
    """What a file or folder is now, cheaply: see the module's docstring. `MISSING` if absent."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return MISSING
    if info["type"] == "directory":
        root = path.rstrip("/")
        entries = fs.find(root, detail=True)
        digest = hashlib.sha256()
        for name in sorted(entries):
            digest.update(f"{name[len(root):]}={_stored_signature(entries[name])}\n".encode())
        return f"folder:{len(entries)}:{digest.hexdigest()}"
    if info.get("size") is not None and info["size"] <= SMALL_FILE_BYTES:
        return "sha256:" + hashlib.sha256(fs.cat_file(path)).hexdigest()
    return _stored_signature(info)


def _stored_signature(info: dict[str, Any]) -> str:
    """A file's signature from its store metadata: a content hash or version tag, else size + time."""
    for key in _STORE_HASHES:
        if info.get(key):
            return f"{key}:{info[key]}"
    when = next((info[key] for key in _STORE_TIMES if info.get(key) is not None), None)
    return f"size:{info.get('size')}:time:{when}"


def make_basis(values: dict[str, Any], inputs: Sequence[str], upstream: Optional[dict[str, str]]) -> dict[str, Any]:
    """A step's basis from its config values, its input URLs (signed now) and its upstream token."""
    return {"config": values, "inputs": {url: signature(url) for url in inputs}, "upstream": upstream}


def fingerprint(basis: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def describe_change(old: Optional[dict[str, Any]], new: dict[str, Any], base: str = "", limit: int = 3) -> str:
    """What differs between two bases, for a log line, config first: `config train.phase2.steps
    4 -> 6`, `preprocess re-ran`, `input eval/best.json changed` (inputs under `base` relative to it)."""
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
    for url, sig in new["inputs"].items():
        if old_inputs.get(url) != sig:
            changes.append(f"input {relative(url, base)} {'is missing' if sig == MISSING else 'changed'}")
    if not changes:
        return "its inputs are listed differently"
    more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
    return "; ".join(changes[:limit]) + more


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


def upstream_token(name: str, record: Optional[dict[str, Any]]) -> Optional[dict[str, str]]:
    """The `upstream` part of the next step's basis: this step's name and when it was last done."""
    done = record["end"] if record and record.get("state") == DONE else None
    return {"step": name, "done": done}
