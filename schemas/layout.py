"""The names of the files and folders showtell's stages write and read, in one place.

Every stage that writes a file and every stage that reads it take its name from here, as TFX's
`features.py` is shared by its preprocessing and its model. The tree of one run root:

    <run_root>/
        raw/                                  data.mirror's default: MSCOCO's three files (download)
        data/                                 published whole by preprocess
            train-00000-of-00256 ...          im2txt's shards (schemas/records.py)
            word_counts.txt                   the vocabulary (schemas/vocabulary.py)
            preprocess_report.json            counts per split, skips by reason, caption lengths (written last)
            word_frequencies.txt              every word of the train split's written captions, with its count
            schema.pbtxt                      the records as a tensorflow-metadata schema
            transform_fn/, transformed_metadata/   tf.Transform's graph
        feature_cache/                        phase 1's encoder features (train.phase1.feature_cache):
            train-00000-of-00256 ...          features and captions per image (schemas/feature_records.py)
            val-00000-of-00004 ...            the val split's central crops
            cache.json                        its key, shard sizes and counts (written last)
        baseline.json                         the model promoted when the run began (or none): its baseline
        data_checks.json                      this run's data statistics against the baseline model's training data
        train/warm_start/                     a warm start's initial weights, remapped to the data's
                                              vocabulary: model.weights.h5, config.yaml,
                                              word_counts.txt, state.json (written last)
        train/phaseN/                         one training phase (Ray Train's run folder)
            checkpoint_000000200/             a checkpoint Ray keeps: model.weights.h5, optimizer.npz, state.json
            history.jsonl                     one line per report
            tensorboard/                      TensorBoard scalars
            final/                            published whole: model.weights.h5, config.yaml,
                                              word_counts.txt, state.json (copied last)
        eval/                                 published whole by evaluate: report.json, report.html, best.json
        best/final/                           the best checkpoint, when it is one of Ray's kept ones
        export/                               the SavedModel: saved_model.pb, variables/,
                                              word_counts.txt, showtell_export.json (written last)
        promote.json                          this run's promotion decision
        manifest.json, .showtell.lock         `showtell run`'s record of its steps, and its lock
        logs/<step>.log                       what each step's engines printed (Ray, TensorFlow, Beam)
        models/                               promote.models_root's default
            current/                          the promoted export, with model.json (copied last)
            previous/<time>-<id>/             each model that was current before
            history.jsonl                     one line per promotion decision
"""
from __future__ import annotations

# --- preprocess: <run_root>/data/ -------------------------------------------------------------
PREPROCESS_REPORT_FILE = "preprocess_report.json"  # what preprocess wrote and skipped; marks a complete data/
RECORD_SCHEMA_FILE = "schema.pbtxt"  # the records' tensorflow-metadata schema
# Every word of the train split's written captions (`<S>` and `</S>` left out) with its count, one
# `word count` a line by descending count, as word_counts.txt but with no threshold: an
# out-of-vocabulary rate under any vocabulary is computed from it.
WORD_FREQUENCIES_FILE = "word_frequencies.txt"

# --- phase 1's feature cache: <run_root>/feature_cache/ -----------------------------------------------
FEATURE_CACHE_FILE = "cache.json"  # the key, its parts, each shard's size and the counts; marks a complete cache

# --- training: <run_root>/train/phaseN/ ---------------------------------------------------------
WEIGHTS_FILE = "model.weights.h5"  # Keras weights of the whole ShowAndTell model
OPTIMIZER_FILE = "optimizer.npz"  # the optimizer's variables, in order
STATE_FILE = "state.json"  # phase, step, weights fingerprint, metrics; marks a complete final/
CONFIG_FILE = "config.yaml"  # the run's whole config, published with final/
HISTORY_FILE = "history.jsonl"  # one JSON object a line, oldest first: a phase's reports, a models root's decisions
FINAL_DIR = "final"  # a phase's published result: everything inference needs
WARM_START_DIR = "warm_start"  # train/warm_start/: the weights a warm-started phase 2 starts from
TENSORBOARD_DIR = "tensorboard"  # a phase's TensorBoard event files

# --- evaluation: <run_root>/eval/ ---------------------------------------------------------------
EVAL_REPORT_FILE = "report.json"  # every checkpoint's metrics and captions; marks a complete eval/
EVAL_HTML_FILE = "report.html"  # the same, for people
BEST_FILE = "best.json"  # the checkpoint eval.select_by chose

# --- export: a SavedModel folder -----------------------------------------------------------------
SAVED_MODEL_FILE = "saved_model.pb"  # TensorFlow's own
EXPORT_METADATA_FILE = "showtell_export.json"  # image size, vocabulary ids, source checkpoint; written last

# --- `showtell run`: <run_root>/ -------------------------------------------------------------------
LOGS_DIR = "logs"  # logs/<step>.log: everything a step's engines printed (Ray, TensorFlow, Beam)
EXPORT_DIR = "export"  # the SavedModel of the best checkpoint
BEST_DIR = "best"  # best/final/: the best checkpoint published, when it is an intermediate one
DECISION_FILE = "promote.json"  # this run's promotion decision
BASELINE_FILE = "baseline.json"  # the model promoted when the run began, pinned for the whole run
DATA_CHECKS_FILE = "data_checks.json"  # the check-data step's comparison with the baseline model's training data
RUN_REPORT_FILE = "report.html"  # <run_root>/report.html: the whole run on one page (orchestration/run_report.py)
MODELS_DIR = "models"  # promote.models_root when it is null

# --- promotion: <models_root>/ ---------------------------------------------------------------------
CURRENT_DIR = "current"  # the promoted model
PREVIOUS_DIR = "previous"  # each model that was current before
MODEL_FILE = "model.json"  # what a promoted model is; marks a complete current/
