"""Reading a models root (`promote.models_root`) and a run's pinned baseline, for every stage.

    <models_root>/current/model.json          the promoted model (orchestration/promote.py writes it)
    <models_root>/previous/<time>-<id>/       each model that was current before, named by its promotion id
    <run_root>/baseline.json                  the model that was current when the run began:
        {"models_root": ..., "pinned": time, "model": <its model.json, or null when none was promoted>}

A run pins its baseline once (`showtell run`'s baseline step), so training's warm start, the
data checks, the head-to-head evaluation and the gate all compare with the same model, even when
another run promotes one meanwhile. A pinned model is found again by its promotion id, in
current/ or, once displaced, in previous/. Plain files only: no TensorFlow, no Beam.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import fsspec

from schemas.config import join_url
from schemas.layout import BASELINE_FILE, CURRENT_DIR, MODEL_FILE, MODELS_DIR, PREVIOUS_DIR
from schemas.storage import absolute, read_json

if TYPE_CHECKING:
    from schemas.config import Config


def models_root_of(config: Config) -> str:
    """`promote.models_root`, by default `<run_root>/models`; local paths made absolute."""
    return absolute(config.promote.models_root or join_url(config.run_root, MODELS_DIR))


def model_id(model: dict[str, Any]) -> str:
    """A promoted model's id: the id of the decision that promoted it."""
    return model["promotion"]["id"]


def current_model(models_root: str) -> Optional[dict[str, Any]]:
    """model.json of `<models_root>/current/`, or None when no model was promoted yet."""
    return read_json(join_url(models_root, CURRENT_DIR, MODEL_FILE))


def find_model(models_root: str, promotion_id: str) -> Optional[str]:
    """The folder of the model promoted by decision `promotion_id`: current/, or its previous/
    folder once another model displaced it; None when it is in neither."""
    model = current_model(models_root)
    if model is not None and model_id(model) == promotion_id:
        return join_url(models_root, CURRENT_DIR)
    fs, path = fsspec.core.url_to_fs(join_url(models_root, PREVIOUS_DIR))
    if not fs.isdir(path):
        return None
    for folder in sorted(fs.ls(path, detail=False), reverse=True):
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(f"-{promotion_id}"):
            return join_url(models_root, PREVIOUS_DIR, name)
    return None


def read_baseline(run_root: str) -> Optional[dict[str, Any]]:
    """The run's pinned baseline (`<run_root>/baseline.json`), or None when none was pinned yet."""
    return read_json(join_url(run_root, BASELINE_FILE))


def baseline_location(run_root: str) -> Optional[str]:
    """Where the run's pinned baseline model is now; None when none was pinned or none was
    promoted when it was. A ShowtellError when the pinned model is gone from its models root."""
    from schemas.errors import ShowtellError

    pinned = read_baseline(run_root)
    if pinned is None or pinned.get("model") is None:
        return None
    location = find_model(pinned["models_root"], model_id(pinned["model"]))
    if location is None:
        raise ShowtellError(
            f"{join_url(run_root, BASELINE_FILE)}: the baseline model (promotion {model_id(pinned['model'])}) is in "
            f"neither current/ nor previous/ of {pinned['models_root']}; re-pin it with `showtell run --force baseline`"
        )
    return location
