"""`showtell export`: a published `final/` checkpoint -> a TensorFlow SavedModel, for TF Serving
and for `showtell caption` (docs/im2txt.md, "Inference", and "What im2txt's users asked for": export for serving).

    export_saved_model("runs/local/train/phase2/final", "exports/showtell")   # any fsspec URL

    OUT/saved_model.pb, variables/   the inference graph; loads with plain tf.saved_model.load,
                                     no showtell or Keras model classes needed
    OUT/word_counts.txt              the vocabulary: word id = line number, <UNK> = number of lines
    OUT/showtell_export.json         image_size, vocab_size, start_id (<S>), end_id (</S>),
                                     unknown_id, num_lstm_units, vocabulary_id (word_counts.txt's
                                     `schemas.vocabulary.vocabulary_id`: loading the export under
                                     another word_counts.txt is refused), the source checkpoint
                                     and its step, and the model's settings (`model`) and weights
                                     fingerprint, from which a warm start rebuilds it
                                     (trainer/warm_start.py)

Signatures (N images, or N beams; `units` = model.num_lstm_units, `vocab` = the model's vocab_size),
also the loaded object's methods (`tf.saved_model.load(OUT).step(input_words, state_h, state_c)`):

    initial_state
        inputs   images       string  [N]            encoded images (JPEG, PNG, ...); decoded,
                                                     resized and centre-cropped in the graph
        outputs  state_h      float32 [N, units]     LSTM state after seeing the image
                 state_c      float32 [N, units]
    step
        inputs   input_words  int64   [N]            the previous word of each caption (<S> first)
                 state_h      float32 [N, units]     its caption's state so far
                 state_c      float32 [N, units]
        outputs  logits       float32 [N, vocab]     next-word logits
                 softmax      float32 [N, vocab]     next-word probabilities
                 state_h      float32 [N, units]     the state after input_words
                 state_c      float32 [N, units]

    caption
        inputs   images       string  [N]            encoded images, as initial_state's
        outputs  captions     string  [N, k]         the k = beam_size best captions, best first
                 word_ids     int64   [N, k, L]      their word ids, then -1 (L = max_caption_length)
                 log_probs    float32 [N, k]         their log-probabilities; -inf: no caption
                 scores       float32 [N, k]         what ranks them (length-normalised or not)
                 finished     bool    [N]            whether the image's captions ended with </S>

`caption` is the whole beam search in one call (inference/caption_signature.py), for clients that
know nothing of showtell: TF Serving, `saved_model_cli run --signature_def caption`, a process with
only TensorFlow. Its settings are fixed at export and recorded in showtell_export.json's
`caption`: {beam_size, max_caption_length, length_normalization}. A client that wants others
captions as im2txt did: `initial_state` once, then `step` from `<S>`, keeping the best
`beam_size` partial captions per image and feeding each one's word and state rows back
(inference/beam_search.py), until `</S>` or max_caption_length words.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time

import fsspec
import tensorflow as tf

from inference.caption_signature import SIGNATURE, Search, make_caption_function
from inference.captioner import FINAL, load_captioner, source_kind
from schemas.config import join_url
from schemas.errors import ShowtellError
from schemas.layout import EXPORT_METADATA_FILE, STATE_FILE
from schemas.storage import absolute, is_local, publish_dir, read_json, read_text, write_text
from schemas.vocabulary import WORD_COUNTS_FILE, vocabulary_id

log = logging.getLogger("showtell.export")

SIGNATURES = ("initial_state", "step", SIGNATURE)


def export_saved_model(checkpoint: str, out: str, search: Search | None = None) -> str:
    """Exports a published `final/` checkpoint as a SavedModel folder at `out` (local path or
    fsspec URL), with its word_counts.txt and `showtell_export.json`; returns `out`. `search`:
    the `caption` signature's beam search settings (default: `eval`'s defaults, im2txt's).

    Written into a staging sibling of `out` (for URLs: written locally, then uploaded there) and
    published over `out` whole (`schemas.storage.publish_dir`), so `out` is never half-written;
    the metadata file goes last.
    """
    if source_kind(checkpoint) != FINAL:
        raise ShowtellError(f"{checkpoint}: already a SavedModel; export takes a published final/ checkpoint")
    started = time.time()
    search = search or Search()
    captioner = load_captioner(checkpoint)
    state = read_json(join_url(checkpoint, STATE_FILE))
    endpoints = captioner.endpoints
    root = tf.Module()  # the SavedModel's object: the three functions and the variables they read
    root.initial_state, root.step = endpoints.initial_state, endpoints.step
    root.caption = make_caption_function(
        endpoints, captioner.words, start_id=captioner.start_id, end_id=captioner.end_id, search=search
    )
    root.model_weights = [weight.value for weight in endpoints.owner.weights]
    signatures = {name: getattr(root, name).get_concrete_function() for name in SIGNATURES}
    metadata = {
        "checkpoint": absolute(checkpoint),
        "phase": state.get("phase"),
        "step": state.get("step"),
        "image_size": captioner.image_size,
        "vocab_size": captioner.vocab_size,
        "num_lstm_units": endpoints.owner.model_cfg.num_lstm_units,
        "start_id": captioner.start_id,
        "end_id": captioner.end_id,
        "unknown_id": len(captioner.words),
        "vocabulary_id": vocabulary_id(captioner.words),
        "caption": dataclasses.asdict(search),  # the `caption` signature's beam search settings
        # What a warm start (`train.init_from`) needs to build the model again and check its weights.
        "model": endpoints.owner.model_cfg.model_dump(mode="json"),
        "fingerprint": state.get("fingerprint"),
    }

    with publish_dir(out, marker=EXPORT_METADATA_FILE) as staging, tempfile.TemporaryDirectory(
        prefix="showtell-export-"
    ) as scratch:
        # SavedModels are written to a local folder only: for a URL, a local one is uploaded.
        local = staging if is_local(out) else os.path.join(scratch, "saved_model")
        log.info("writing the SavedModel of %s to %s", checkpoint, out)
        tf.saved_model.save(root, local, signatures=signatures)
        word_counts = read_text(join_url(checkpoint, WORD_COUNTS_FILE))
        write_text(os.path.join(local, WORD_COUNTS_FILE), word_counts)
        write_text(os.path.join(local, EXPORT_METADATA_FILE), json.dumps(metadata, indent=1) + "\n")
        if not is_local(out):
            fs, staging_path = fsspec.core.url_to_fs(staging)
            fs.put(local.rstrip("/") + "/", staging_path.rstrip("/") + "/", recursive=True)
    log.info("exported %s (step %s) to %s in %.1f s", checkpoint, state.get("step"), out, time.time() - started)
    return out
