"""Beam's RunInference over a `showtell export`: a TensorFlow model handler whose model is the
export's `caption` signature (inference/caption_signature.py), so one call captions a batch.

    images | RunInference(KeyedModelHandler(CaptionModelHandler("exports/showtell", max_batch_size=64)))
    # (key, encoded image bytes) -> (key, PredictionResult(example=bytes, inference=[(sentence, p), ...]))

Why not Beam's own `TFModelHandlerTensor`: its module imports `tensorflow_hub` (not a dependency
here), and it loads models with Keras' `load_model`, which Keras 3 refuses for a SavedModel. This
handler loads with `tf.saved_model.load` (through `load_captioner`, which also checks the export's
vocabulary) and leaves batching to RunInference: up to `max_batch_size` images per call, Beam's
BatchElements sizing batches between.

Images come checked by their header only (`pipelines.images.check_header`): the graph decodes
them anyway, and decoding twice would cost as much as the model. A batch the graph cannot decode
is checked image by image (`Captioner.caption_each`, as `showtell serve` does); an image that
does not decode is re-encoded as the preprocess step does (`check_image`), and when that fails
too its inference is `CORRUPT`, the reason an error line gives, instead of captions. TensorFlow
is imported in the workers only.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from pipelines.images import CORRUPT, check_image
from schemas.errors import ShowtellError

if TYPE_CHECKING:
    from inference.captioner import Captioner

Captions = list[tuple[str, float]]  # an image's captions, best first: (sentence, probability)


class CaptionModelHandler(ModelHandler[bytes, PredictionResult, "Captioner"]):
    """Encoded images -> their captions by the export's `caption` signature, with the settings
    it was exported with, or CORRUPT for an image that no decoder reads."""

    def __init__(self, export: str, max_batch_size: int):
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size)
        self._export = export  # the export folder (any fsspec URL)

    def load_model(self) -> Captioner:
        from inference.captioner import load_captioner

        captioner = load_captioner(self._export)
        if captioner.graph_search is None:
            raise ShowtellError(f"{self._export}: an export without a caption signature; export it again")
        return captioner

    def run_inference(
        self, batch: Sequence[bytes], model: Captioner, inference_args: Optional[dict[str, Any]] = None
    ) -> Iterable[PredictionResult]:
        search = dataclasses.asdict(model.default_search())  # the export's `caption` settings: one call
        captions = model.caption_each(list(batch), **search)
        return [
            PredictionResult(image, _reencoded(model, image, search) if isinstance(result, ShowtellError) else result)
            for image, result in zip(batch, captions)
        ]

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(image) for image in batch)

    def get_metrics_namespace(self) -> str:
        return "showtell_caption_batch"


def _reencoded(model: Captioner, image: bytes, search: dict[str, Any]) -> Captions | str:
    """The captions of an image the graph cannot decode as it is, once re-encoded as the preprocess
    step does (`check_image`); CORRUPT when no decoder reads it."""
    verdict = check_image(image, max_pixels=sys.maxsize)  # its size passed already
    return CORRUPT if verdict.jpeg is None else model.caption([verdict.jpeg], **search)[0]
