"""Captions for encoded images, from a published `final/` checkpoint or an exported SavedModel
(docs/im2txt.md, "Inference").

    captioner = load_captioner("runs/local/train/phase2/final")   # or `showtell export`'s folder
    captioner.caption([jpeg_bytes], beam_size=3)
    # [[("a large red circle on a white background", 0.040413), ...]]   per image, best first

A Captioner is beam search's StepModel (inference/beam_search.py) over encoded image bytes:

    state = captioner.initial_state(images)          # string [N] -> {"state_h", "state_c"}, each float32 [N, units]
    logits, state = captioner.step(words, state)      # int [N], state -> logits float32 [N, vocab], state

Both run the two `Endpoints` tf.functions, fixed signatures so beam search traces each once. The
same functions are what `inference.export` saves as the SavedModel's signatures, so a checkpoint
and its export decode, preprocess (`trainer.inputs.preprocess_image`, eval mode, inside the
graph) and caption identically.

Either is loaded only with its own vocabulary: a final/ whose word_counts.txt is not the one its
state.json records, or an export whose word_counts.txt is not the one its showtell_export.json
records (`vocabulary_id`), is refused; one written before showtell recorded it is taken as it is.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Sequence

import tensorflow as tf
import yaml

from inference.beam_search import beam_search
from inference.caption_signature import SEARCH_FIELDS, Search
from schemas import progress
from schemas.config import join_url
from schemas.errors import ShowtellError
from schemas.layout import CONFIG_FILE, EXPORT_METADATA_FILE, SAVED_MODEL_FILE, STATE_FILE, WEIGHTS_FILE
from schemas.storage import exists, read_bytes, read_json, read_text
from schemas.vocabulary import END_WORD, START_WORD, UNKNOWN_WORD, WORD_COUNTS_FILE, Vocabulary, parse_word_counts
from trainer import checkpoints as ckpt
from trainer.inputs import preprocess_image

if TYPE_CHECKING:
    from trainer.model import ShowAndTell

log = logging.getLogger("showtell.caption")

STATE_NAMES = ("state_h", "state_c")  # the LSTM state [h, c], as named in every signature

# What `showtell export` writes next to saved_model.pb; the metadata file is written last.
FINAL_FILES = (WEIGHTS_FILE, CONFIG_FILE, WORD_COUNTS_FILE, STATE_FILE)
FINAL, SAVED_MODEL = "final/ checkpoint", "SavedModel"  # what `source_kind` finds

State = dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """The inference graph of a ShowAndTell, as two tf.functions over named tensors:

        initial_state(images: string [N])
            -> {"state_h": float32 [N, units], "state_c": float32 [N, units]}
        step(input_words: int64 [N], state_h: float32 [N, units], state_c: float32 [N, units])
            -> {"logits": float32 [N, vocab], "softmax": float32 [N, vocab],
                "state_h": float32 [N, units], "state_c": float32 [N, units]}

    A SavedModel that `inference.export` wrote, once loaded, has the same two functions.
    """

    initial_state: Callable[..., dict[str, tf.Tensor]]
    step: Callable[..., dict[str, tf.Tensor]]
    owner: Any = None  # what holds the variables (the model, a loaded SavedModel): kept alive with them


def make_endpoints(model: ShowAndTell) -> Endpoints:
    """The Endpoints of a built ShowAndTell; images are decoded and preprocessed in the graph."""
    size = model.model_cfg.image_size
    units = model.model_cfg.num_lstm_units
    pixels_spec = tf.TensorSpec([size, size, 3], tf.float32)
    state_spec = tf.TensorSpec([None, units], tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")], autograph=False)
    def initial_state(images: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = tf.map_fn(
            lambda image: preprocess_image(image, size, training=False), images, fn_output_signature=pixels_spec
        )
        return dict(zip(STATE_NAMES, model.initial_state(pixels)))

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.int64, name="input_words"),
            tf.TensorSpec.from_spec(state_spec, name="state_h"),
            tf.TensorSpec.from_spec(state_spec, name="state_c"),
        ],
        autograph=False,
    )
    def step(input_words: tf.Tensor, state_h: tf.Tensor, state_c: tf.Tensor) -> dict[str, tf.Tensor]:
        logits, new_state = model.step(input_words, [state_h, state_c])
        return {"logits": logits, "softmax": tf.nn.softmax(logits), **dict(zip(STATE_NAMES, new_state))}

    return Endpoints(initial_state, step, owner=model)


class Captioner:
    """Beam search captions for encoded images (JPEG, PNG, ...: whatever preprocess_image decodes).

    `words[i]` is word id i (word_counts.txt's lines); id len(words) is `<UNK>`.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        vocabulary: Vocabulary,
        image_size: int,
        vocab_size: int,
        graph_search: GraphSearch | None = None,
    ):
        if len(vocabulary.words) + 1 > vocab_size:
            raise ShowtellError(
                f"word_counts.txt has {len(vocabulary.words)} words + <UNK> but the model has only {vocab_size} ids"
            )
        missing = [word for word in (START_WORD, END_WORD) if word not in vocabulary.words]
        if missing:
            raise ShowtellError(f"word_counts.txt has no {' or '.join(missing)} line: it is not im2txt's vocabulary")
        self.endpoints = endpoints
        self.vocab_size = vocab_size  # the model's; at least len(words) + 1
        self.words: list[str] = list(vocabulary.words)
        self.start_id: int = vocabulary.ids([START_WORD])[0]
        self.end_id: int = vocabulary.ids([END_WORD])[0]
        self.image_size = image_size
        self.graph_search = graph_search  # an export's `caption` signature, used when its settings are asked for

    @classmethod
    def from_model(cls, model: ShowAndTell, word_counts_text: str) -> Captioner:
        """Wraps a built ShowAndTell (any checkpoint's weights) with its word_counts.txt text."""
        vocabulary = parse_word_counts(word_counts_text)
        return cls(make_endpoints(model), vocabulary, model.model_cfg.image_size, model.vocab_size)

    def initial_state(self, images: tf.Tensor | Sequence[bytes]) -> State:
        """Encoded images, string [N] -> the LSTM state after the image: {"state_h", "state_c"}, [N, units]."""
        return self.endpoints.initial_state(images=tf.convert_to_tensor(images, tf.string))

    def step(self, input_words: tf.Tensor, state: State) -> tuple[tf.Tensor, State]:
        """Word ids, int [M], and their state -> next-word logits float32 [M, vocab], the new state."""
        outputs = self.endpoints.step(input_words=tf.cast(input_words, tf.int64), **state)
        return outputs["logits"], {name: outputs[name] for name in STATE_NAMES}

    def caption_each(self, images: Sequence[bytes], **search: Any) -> list[list[tuple[str, float]] | ShowtellError]:
        """`caption` in one batch, for images not checked beforehand: should the graph fail to
        decode one, each image is checked on its own (`check_image`) and the ones that decode are
        captioned in another call, so per image its captions or the ShowtellError saying why not.
        `search`: caption's beam search settings."""
        try:
            return list(self.caption(images, batch_size=max(len(images), 1), **search))
        except tf.errors.OpError:  # an image that does not decode (as check_image catches): which one(s)?
            pass
        errors: list[ShowtellError | None] = []
        for data in images:
            try:
                self.check_image(data)
                errors.append(None)
            except ShowtellError as error:
                errors.append(error)
        good = [data for data, error in zip(images, errors) if error is None]
        captions = iter(self.caption(good, batch_size=len(good), **search) if good else [])
        return [error or next(captions) for error in errors]

    def default_search(self) -> Search:
        """The settings `showtell caption` uses unless told otherwise: an export's `caption`
        signature's (so one graph call captions a batch), else eval's defaults (im2txt's)."""
        return self.graph_search.search if self.graph_search is not None else Search()

    def uses_signature(self, search: Search) -> bool:
        """Whether `caption` with these settings is one call of an export's `caption` signature."""
        return self.graph_search is not None and self.graph_search.search == search

    def check_image(self, data: bytes) -> None:
        """Raises ShowtellError when the graph could not decode `data` (run eagerly, one image),
        so one bad file never fails a batch."""
        try:
            preprocess_image(tf.constant(data), self.image_size, training=False)
        except tf.errors.OpError as error:
            # The op's own words, without TF's `{{function_node ...}}` prefix and `[Op:...]` suffix.
            reason = re.sub(r"\{\{.*?\}\}|\[Op:[^\]]*\]", "", error.message).strip()
            raise ShowtellError(f"not an image that can be decoded ({reason})") from None

    def caption(
        self,
        images: Sequence[bytes],
        *,
        beam_size: int = 3,
        max_caption_length: int = 20,
        length_normalization: float = 0.0,
        batch_size: int = 64,
    ) -> list[list[tuple[str, float]]]:
        """Per image, up to `beam_size` captions as (sentence, probability), best first (as
        inference.beam_search ranks them); batches of `batch_size` images share one model call per
        decoding step, or, with an export's `caption` signature traced with these settings, one
        call of it."""
        graph = self.uses_signature(Search(beam_size, max_caption_length, length_normalization))
        results: list[list[tuple[str, float]]] = []
        for start in range(0, len(images), batch_size):
            batch = tf.constant(list(images[start : start + batch_size]), tf.string)
            if graph:
                results += self.graph_search.caption(batch)
                continue
            for captions in beam_search(
                self,
                batch,
                start_id=self.start_id,
                end_id=self.end_id,
                beam_size=beam_size,
                max_caption_length=max_caption_length,
                length_normalization=length_normalization,
            ):
                results.append([(self.sentence(c.word_ids), c.prob) for c in captions])
            log.debug("captioned %d of %d images", len(results), len(images))
        return results

    def sentence(self, word_ids: Sequence[int]) -> str:
        """Word ids -> their words joined by spaces, `<S>` and `</S>` left out, `<UNK>` for any
        id past the vocabulary."""
        return " ".join(
            self.words[i] if i < len(self.words) else UNKNOWN_WORD
            for i in map(int, word_ids)
            if i not in (self.start_id, self.end_id)
        )


@dataclasses.dataclass(frozen=True)
class GraphSearch:
    """An export's `caption` signature (inference/caption_signature.py) and the settings it was
    traced with (showtell_export.json's `caption`)."""

    function: Callable[..., dict[str, tf.Tensor]]
    search: Search

    def caption(self, images: tf.Tensor) -> list[list[tuple[str, float]]]:
        """Encoded images, string [N] -> per image, its captions as (sentence, probability), best first."""
        outputs = {name: tensor.numpy() for name, tensor in self.function(images=images).items()}
        return [
            [(sentence.decode(), math.exp(p)) for sentence, p in zip(sentences, log_probs) if p > -math.inf]
            for sentences, log_probs in zip(outputs["captions"], outputs["log_probs"])
        ]


def caption_files(
    captioner: Captioner, paths: Sequence[str], *, batch_size: int = 64, **search: Any
) -> list[dict[str, Any]]:
    """Per path, in order, {"path", "captions": [{"sentence", "p"}, ...]} (best first) or
    {"path", "error"}. Every file is read (any fsspec URL); a batch that does not decode is
    checked image by image (`Captioner.caption_each`), so a missing, unreadable or non-image file
    gets its error and the others still get captions, and a good image is decoded once.
    `batch_size` and `search`: Captioner.caption's keyword arguments. A progress display
    (`schemas.progress`) counts the images captioned."""
    results: list[dict[str, Any]] = []
    readable: list[tuple[dict[str, Any], bytes]] = []
    for path in paths:
        result: dict[str, Any] = {"path": path}
        results.append(result)
        try:
            data = read_bytes(path)
        except ShowtellError as error:
            result["error"] = str(error)
            continue
        readable.append((result, data))
    images = [data for _, data in readable]
    settings = Search(**{name: search[name] for name in SEARCH_FIELDS if name in search})
    if captioner.graph_search is not None and not captioner.uses_signature(settings):
        log.info(
            "the export's caption signature has %s; searching with %s over its step signature instead (slower)",
            captioner.graph_search.search.describe(),
            settings.describe(),
        )
    captions: list[list[tuple[str, float]] | ShowtellError] = []
    with progress.tracked("caption", total=len(images), unit="images"):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            captions += captioner.caption_each(batch, **search)
            progress.advance(len(batch))
    for (result, _), image_captions in zip(readable, captions):
        if isinstance(image_captions, ShowtellError):
            result["error"] = str(image_captions)
        else:
            result["captions"] = [{"sentence": sentence, "p": p} for sentence, p in image_captions]
    return results


def source_kind(path: str) -> str:
    """`FINAL` for a published final/ checkpoint, `SAVED_MODEL` for a `showtell export` folder;
    ShowtellError naming `path` when it is missing, incomplete or neither."""
    if not exists(path):
        raise ShowtellError(f"{path}: not found")
    if exists(join_url(path, SAVED_MODEL_FILE)):
        return SAVED_MODEL
    present = [name for name in FINAL_FILES if exists(join_url(path, name))]
    if not present:
        raise ShowtellError(
            f"{path}: neither a published final/ checkpoint ({', '.join(FINAL_FILES)}) "
            f"nor a SavedModel from `showtell export`"
        )
    if len(present) < len(FINAL_FILES):
        missing = [name for name in FINAL_FILES if name not in present]
        raise ShowtellError(f"{path}: incomplete final/ checkpoint, no {', '.join(missing)}")
    return FINAL


def load_captioner(path: str) -> Captioner:
    """A Captioner from a published `final/` checkpoint or a `showtell export` SavedModel
    folder, at a local path or any fsspec URL. ShowtellError naming `path` if it is missing,
    neither of the two, does not load, or holds a word_counts.txt that is not its own."""
    kind = source_kind(path)
    log.info("loading the %s at %s", kind, path)
    try:
        return _load_saved_model(path) if kind == SAVED_MODEL else _load_final(path)
    except ShowtellError as error:
        text = str(error)
        raise ShowtellError(text if text.startswith(f"{path}: ") else f"{path}: {text}") from None
    except (OSError, ValueError, KeyError, yaml.YAMLError, tf.errors.OpError) as error:
        lines = str(error).strip().splitlines()
        raise ShowtellError(f"{path}: cannot load this {kind}: {lines[0] if lines else type(error).__name__}") from None


def _load_final(path: str) -> Captioner:
    loaded = ckpt.CheckpointLoader().load(path)
    return Captioner.from_model(loaded.model, loaded.word_counts)


def _load_saved_model(path: str) -> Captioner:
    metadata = read_json(join_url(path, EXPORT_METADATA_FILE))
    if metadata is None:
        raise ShowtellError(f"a SavedModel without {EXPORT_METADATA_FILE}: not written by `showtell export`")
    vocabulary = parse_word_counts(read_text(join_url(path, WORD_COUNTS_FILE)))
    recorded = metadata.get("vocabulary_id")  # None in an export written before showtell recorded it
    if recorded is not None and recorded != vocabulary.id:
        raise ShowtellError(
            f"its {EXPORT_METADATA_FILE} records vocabulary {recorded} but its {WORD_COUNTS_FILE} is vocabulary "
            f"{vocabulary.id}: an inconsistent export; put back the {WORD_COUNTS_FILE} it was exported with"
        )
    with tempfile.TemporaryDirectory(prefix="showtell-saved-model-") as scratch:
        local = ckpt.fetch_dir(path, os.path.join(scratch, "saved_model"))
        loaded = tf.saved_model.load(local)  # variables are restored into memory: scratch may go
    endpoints = Endpoints(loaded.initial_state, loaded.step, owner=loaded)
    # Exports written before the `caption` signature have neither it nor its settings.
    graph_search = GraphSearch(loaded.caption, Search(**metadata["caption"])) if "caption" in metadata else None
    return Captioner(endpoints, vocabulary, metadata["image_size"], metadata["vocab_size"], graph_search)
