"""The typed configuration of a showtell run, loaded from YAML plus `--set a.b=value` overrides.

Every field carries a comment saying what it holds. Unknown keys are errors, and every error
names the dotted key at fault and why, e.g. ``data.shards.train: Input should be greater than 0``.
`load_dated_config` also fills in `{date}` (the run's day), for `showtell run` and `showtell status`.
"""
from __future__ import annotations

import json
import os
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.dates import DATE_FIELD, fill_date, run_day
from schemas.errors import ShowtellError

# The three files of MSCOCO 2014, relative to a source base URL (docs/im2txt.md, "Data").
ANNOTATIONS_ZIP = "annotations/annotations_trainval2014.zip"
TRAIN_IMAGES_ZIP = "zips/train2014.zip"
VAL_IMAGES_ZIP = "zips/val2014.zip"
MSCOCO_FILES = (ANNOTATIONS_ZIP, TRAIN_IMAGES_ZIP, VAL_IMAGES_ZIP)


class ConfigError(ShowtellError):
    """A config file or override that does not fit the schema; the message names the key."""


class _Strict(BaseModel):
    # strict: `true` is not an int, `"3"` is not a number; YAML already gives real types.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class Shards(_Strict):
    train: int = Field(256, gt=0)  # TFRecord files written for the training split (im2txt: 256)
    val: int = Field(4, gt=0)  # files for the validation split (im2txt: 4)
    test: int = Field(8, gt=0)  # files for the test split (im2txt: 8)


class SampleData(_Strict):
    """What pipelines/sample_data.py generates, for `source: sample` and `showtell sample-data`.

    Every limit on these settings is checked here, from a config file and from the command line
    alike. Each field's `description` says its limit in words, for `checked`'s messages.
    """

    MAX_IMAGES: ClassVar[int] = 100_000  # train + val images at most, so the generator's random ids stay sparse
    MIN_IMAGE_SIZE: ClassVar[int] = 32  # smaller images no longer show their shapes
    MAX_IMAGE_SIZE: ClassVar[int] = 1024  # keeps the generator's supersampled drawing canvas in memory bounds

    # Images in the sample's train2014.zip.
    train_images: int = Field(60, gt=0, description="a positive integer")
    # Images in the sample's val2014.zip (split 85/5/10 as MSCOCO's).
    val_images: int = Field(40, gt=0, description="a positive integer")
    # Seed of the sample generator: same seed, same bytes.
    seed: int = Field(0, ge=0, description="a non-negative integer")
    # Width and height of the sample's images, in pixels.
    image_size: int = Field(
        96,
        ge=MIN_IMAGE_SIZE,
        le=MAX_IMAGE_SIZE,
        description=f"an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}",
    )

    @model_validator(mode="after")
    def _not_too_many_images(self) -> "SampleData":
        total = self.train_images + self.val_images
        if total > self.MAX_IMAGES:
            raise ValueError(f"at most {self.MAX_IMAGES:,} images in all, got {total:,}")
        return self

    @classmethod
    def checked(cls, **settings: Any) -> "SampleData":
        """The sample `settings` give (the defaults for any left out); a bad one is a ConfigError
        that names it, as `generate_sample_data` and `showtell sample-data` report it:

            SampleData.checked(train_images=3, seed=7).val_images  # -> 40
            SampleData.checked(image_size=8)
            # ConfigError: sample data: image_size must be an integer from 32 to 1024, got 8
        """
        try:
            return cls(**settings)
        except ValidationError as error:
            raise ConfigError(f"sample data: {describe_errors(error, cls)}") from None


class Download(_Strict):
    retries: int = Field(5, ge=0)  # further attempts after a failed request (5xx, timeout, dropped connection)
    backoff_seconds: float = Field(1.0, ge=0)  # first wait between attempts; doubles each attempt
    timeout_seconds: float = Field(60.0, gt=0)  # socket read timeout of one request
    chunk_bytes: int = Field(4 << 20, gt=0)  # bytes read per streaming chunk


class Data(_Strict):
    # Where MSCOCO comes from: `sample` (generated here), a local path, or a file://, http(s)://,
    # gs:// or s3:// base URL that holds MSCOCO's layout (annotations/..., zips/...).
    source: str = "sample"
    # Where the three files are mirrored to; null means `<run_root>/raw`.
    mirror: Optional[str] = None
    shards: Shards = Shards()  # shard counts per split
    min_word_count: int = Field(4, ge=1)  # keep words seen at least this often in training captions
    max_image_pixels: int = Field(25_000_000, gt=0)  # images with more pixels are skipped, not decoded
    shuffle_seed: int = 12345  # seed of the record-to-shard shuffle (im2txt's seed)
    # Known checksums of source files, keyed by the file's relative path, as "sha256:<hex>" or
    # "md5:<hex>". Files not listed are verified by size (and by the store's own MD5 where it has one).
    checksums: dict[str, str] = {}
    sample: SampleData = SampleData()  # what `source: sample` generates
    download: Download = Download()  # network behaviour of `showtell download`


class Checks(_Strict):
    """The data checks before any training (`showtell run`'s check-data step, pipelines/data_checks.py):
    this run's data statistics against those of the data the run's baseline model (the one
    promoted when the run began) was trained on. A check past its threshold is an anomaly, and
    the run stops before training. Null turns a check off. The defaults let a night of ~20% more
    data of the same kind pass, and stop one where 40% of the images are corrupt or half the
    captions are a single word."""

    # A split's share of its listed images skipped for one reason (corrupt_image, missing_image,
    # ...) may be at most this much above the champion's share for that reason: 0.05 = 5 points.
    max_skip_rate_increase: Optional[float] = Field(0.05, ge=0, le=1, allow_inf_nan=False)
    # The L-infinity distance between a split's caption length histogram (words per written
    # caption, normalised) and the champion's: the largest difference in one length's share of
    # the captions, as tensorflow-data-validation's drift comparator measures it.
    max_caption_length_drift: Optional[float] = Field(0.2, ge=0, le=1, allow_inf_nan=False)
    # A split's caption lengths are compared only when it and the champion's each have at least
    # this many written captions: in fewer, chance alone moves a length's share past the threshold.
    min_captions_compared: int = Field(100, ge=1)
    # The share of the train captions' words that the champion's vocabulary lacks may be at most
    # this much above the share its own training captions had under it: 0.05 = 5 points.
    max_oov_rate_increase: Optional[float] = Field(0.05, ge=0, le=1, allow_inf_nan=False)
    # A split's records written must be at least this fraction of the champion's: 0.5 stops a
    # night whose records fell by more than half.
    min_records_ratio: Optional[float] = Field(0.5, ge=0, le=1, allow_inf_nan=False)


class Beam(_Strict):
    runner: str = "DirectRunner"  # any Beam runner name: DirectRunner, DataflowRunner, FlinkRunner, ...
    # DirectRunner only: `multi_processing` runs bundles in `direct_num_workers` processes.
    direct_running_mode: Literal["in_memory", "multi_threading", "multi_processing"] = "multi_processing"
    direct_num_workers: int = Field(0, ge=0)  # DirectRunner worker count; 0 means one per CPU core
    # Extra pipeline options passed to Beam untouched, e.g. ["--project=p", "--region=us-central1"].
    options: list[str] = []


class Model(_Strict):
    """Show and Tell as im2txt (docs/im2txt.md, "Model")."""

    # Image encoder from keras.applications: im2txt's Inception v3, or a small one for CPU demos.
    encoder: Literal["inception_v3", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0"] = "inception_v3"
    image_size: int = Field(299, ge=32)  # encoder input height and width, in pixels
    # `imagenet` (Keras' download), `none` (random init), or a weights file at any fsspec URL.
    encoder_weights: str = "imagenet"
    embedding_size: int = Field(512, gt=0)  # image and word embedding width
    num_lstm_units: int = Field(512, gt=0)  # LSTM state width
    dropout_keep: float = Field(0.7, gt=0, le=1)  # keep probability of the LSTM's inputs and outputs when training
    init_scale: float = Field(0.08, gt=0)  # weights start uniform in [-init_scale, init_scale]
    vocab_size: Optional[int] = Field(None, gt=0)  # null: lines of word_counts.txt + 1 (for <UNK>)
    # Momentum of the encoder's batch-norm moving statistics; null keeps the encoder's own (0.999
    # for MobileNetV3, 0.99 for Inception v3). A randomly initialised encoder trained briefly
    # (the CPU demo) needs a short one, or inference-mode features stay those of the initial
    # statistics and every image looks alike.
    batch_norm_momentum: Optional[float] = Field(None, gt=0, lt=1)


class Phase(_Strict):
    steps: int = Field(gt=0)  # training steps of this phase (global: counted once, not per worker)
    batch_size: int = Field(32, gt=0)  # examples per worker per step; global batch = this x workers
    learning_rate: float = Field(gt=0)  # initial learning rate (SGD)
    # Staircase decay: multiply by this factor every `epochs_per_decay` epochs; 1.0 = constant.
    learning_rate_decay_factor: float = Field(gt=0, le=1)
    epochs_per_decay: float = Field(8.0, gt=0)  # epochs between decays
    clip_gradients: float = Field(5.0, gt=0)  # global gradient norm clip
    train_encoder: bool  # False: the encoder is frozen (phase 1); True: fine-tune everything (phase 2)
    checkpoint_every: int = Field(1000, gt=0)  # steps between checkpoints (and Ray reports)
    checkpoints_kept: int = Field(5, gt=0)  # newest checkpoints Ray keeps


class FeatureCache(_Strict):
    """Phase 1 from the frozen encoder's features, computed once by a batch job
    (pipelines/feature_cache.py) instead of at every step: the embedding, LSTM and logits train on
    them. Rebuilt only when its key changes: the encoder's weights, model.image_size, the
    augmentation (train.random_flip), `views`, `seed` or the data."""

    enabled: bool = False  # off: phase 1 runs the frozen encoder on every image at every step (im2txt)
    # Features kept per training image: the central crop, then views - 1 random crops, flips and
    # colour distortions (im2txt's training augmentation); training draws one at each visit.
    views: int = Field(4, gt=0, le=64)
    seed: int = Field(0, ge=0)  # seeds the augmented views: the same seed gives the same views
    batch_size: int = Field(32, gt=0)  # images per encoder call while building (not part of the key)


class Phase1(Phase):
    """im2txt's first phase: Inception frozen, SGD 2.0 halved every 8 epochs, 1,000,000 steps."""

    steps: int = Field(1_000_000, gt=0)
    learning_rate: float = Field(2.0, gt=0)
    learning_rate_decay_factor: float = Field(0.5, gt=0, le=1)
    train_encoder: bool = False
    # Steps that first train the encoder alone to predict the words of training captions, when
    # phase 1 starts fresh (trainer/encoder_pretrain.py): a stand-in for ImageNet weights where
    # none can be loaded (the offline demo). 0: off, as im2txt.
    encoder_pretrain_steps: int = Field(0, ge=0)
    encoder_pretrain_learning_rate: float = Field(0.5, gt=0)  # SGD (momentum 0.9) rate of those steps
    feature_cache: FeatureCache = FeatureCache()  # train from cached encoder features (needs a frozen, fixed encoder)

    @model_validator(mode="after")
    def _cache_needs_a_fixed_encoder(self) -> "Phase1":
        if self.feature_cache.enabled and self.train_encoder:
            raise ValueError("feature_cache.enabled needs a frozen encoder: train_encoder must be false")
        if self.feature_cache.enabled and self.encoder_pretrain_steps:
            raise ValueError(
                "feature_cache.enabled needs fixed encoder weights: encoder_pretrain_steps must be 0 "
                "(pretraining changes the encoder the features would come from)"
            )
        return self


class Phase2(Phase):
    """im2txt's fine-tune: everything trainable, learning rate 0.0005, to ~3,000,000 steps in all."""

    steps: int = Field(2_000_000, gt=0)
    learning_rate: float = Field(0.0005, gt=0)
    learning_rate_decay_factor: float = Field(1.0, gt=0, le=1)
    train_encoder: bool = True


class ShardCache(_Strict):
    """Where each input pipeline (one per training worker, and evaluation's perplexity) keeps the
    shards it reads from a remote store (s3://, gs://, ...): the next ones are downloaded while the
    current ones are read, and each is deleted once read. Local shards are read in place."""

    # Local folder the cached shards go under (each pipeline makes its own subfolder, removed when
    # it ends); null: the system's temp folder.
    folder: Optional[str] = None
    # Bytes of shards on local disk at most, per pipeline; at least 5 of the largest shards (the 4
    # read at once and the next one), or training stops at once with an error naming this key.
    max_bytes: int = Field(2 << 30, gt=0)


class Train(_Strict):
    phase1: Phase1 = Phase1()  # encoder frozen
    phase2: Phase2 = Phase2()  # fine-tune, from phase 1's final checkpoint
    # Where training starts (trainer/warm_start.py): `none` (phase 1 from scratch, then phase 2 from
    # phase 1: im2txt); `promoted` (the model promoted in promote.models_root when the run began, as
    # the run's baseline; with none promoted yet, as `none`); or the URL of a `final/` checkpoint or a
    # `showtell export` folder. A warm start skips phase 1: phase 2 fine-tunes the model's weights for
    # `warm_start_steps` steps, its vocabulary remapped to the data's (words kept, added, dropped).
    init_from: str = Field("none", min_length=1)
    warm_start_steps: int = Field(20_000, gt=0)  # phase 2's steps when it starts from train.init_from
    # Wall-clock limit of a warm-started fine-tune, in minutes (null: none), so a night's training
    # fits its window: once past it, every worker stops after the step it is on, and that step is
    # checkpointed and published as phase 2's final/, its state.json saying `stopped: max_minutes`.
    # Training from scratch (no model to start from: a first night) is not limited by it.
    max_minutes: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    # Training examples per epoch (for the decay schedule); null: records written to train shards.
    num_examples_per_epoch: Optional[int] = Field(None, gt=0)
    mixed_precision: Literal["off", "bf16", "fp16"] = "off"  # compute dtype on GPUs; off on CPU
    xla: bool = False  # compile the train step with XLA
    shuffle_buffer: int = Field(2048, ge=0)  # records shuffled in memory per worker
    # Mirror training images left-right half the time (im2txt). Off where captions say "left" and
    # "right" (the sample's do): a mirrored image contradicts its caption.
    random_flip: bool = True
    seed: int = 0  # seeds weight init, shuffling and augmentation
    shard_cache: ShardCache = ShardCache()  # local copies of remote shards while they are read

    def phase(self, number: int) -> Phase:
        """`phase1` or `phase2` by number (1 or 2: the CLI's `--phase` accepts no other)."""
        return {1: self.phase1, 2: self.phase2}[number]


class Ray(_Strict):
    address: Optional[str] = None  # an existing cluster (`auto`, `ray://host:10001`); null starts a local one
    num_workers: int = Field(2, gt=0)  # data-parallel training workers
    use_gpu: bool = False  # one GPU per worker
    resources_per_worker: dict[str, float] = {}  # e.g. {CPU: 4}; Ray's default is 1 CPU
    max_failures: int = Field(0, ge=-1)  # worker failures survived by restarting from the last checkpoint (-1: forever)
    # A cluster showtell joins (ray.address, $RAY_ADDRESS) that cannot place the workers yet is waited
    # on this long (an autoscaler may be adding nodes), then the phase fails naming what it asked for.
    # A local cluster (address null) without the resources asked for is refused at once.
    startup_timeout_s: float = Field(600.0, gt=0)
    # run_root is a local path that every node of a joined cluster mounts at the same place (NFS, a
    # shared volume). Without it, a local run_root with a multi-node cluster is refused: training
    # workers on other nodes cannot read or write the driver's disk.
    shared_filesystem: bool = False
    # Elastic training: after a worker or node is lost, Ray Train may go on with as few as this many
    # workers (at the same global batch, ray.num_workers x the phase's batch_size) when no more fit,
    # and grows back to ray.num_workers when they do; null: always ray.num_workers.
    min_workers: Optional[int] = Field(None, gt=0)


# COCO caption metrics as pycocoevalcap names them; SPICE only with `eval.spice`.
Metric = Literal["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]
METRICS: tuple[str, ...] = get_args(Metric)


class Eval(_Strict):
    """The batch evaluation of every collected checkpoint (docs/im2txt.md, "Inference")."""

    split: Literal["train", "val", "test"] = "test"  # the split whose images are captioned and scored
    # `all`: both phases' final/ and every checkpoint Ray kept; `final`: the two final/ only.
    checkpoints: Literal["all", "final"] = "all"
    beam_size: int = Field(3, gt=0)  # beam width (im2txt: 3)
    max_caption_length: int = Field(20, gt=0)  # words per caption at most, </S> not counted (im2txt: 20)
    # Rank finished captions by log p / words**this; 0: off (im2txt). Finite: inf would rank nothing.
    length_normalization: float = Field(0.0, ge=0, allow_inf_nan=False)
    batch_size: int = Field(64, gt=0)  # images per beam-search batch (one model call per step for all beams)
    select_by: Metric = "CIDEr"  # the metric that names best.json (higher is better)
    spice: bool = False  # also SPICE (Java; fetches Stanford CoreNLP on first use, so off by default)
    max_images: Optional[int] = Field(None, gt=0)  # evaluate only this many images of the split; null: all
    report_images: int = Field(12, ge=0)  # test images shown with their captions in report.html


class Promote(_Strict):
    """Which model becomes `<models_root>/current/` (TFX's Evaluator + Pusher): `showtell run`'s last step."""

    # Where promoted models live: current/, previous/<time>/ and history.jsonl; null means
    # `<run_root>/models`. Set one shared root when run_root changes per run (e.g. `{date}`).
    models_root: Optional[str] = None
    metric: Metric = "CIDEr"  # the report metric compared, higher is better (SPICE needs eval.spice)
    # The new model is promoted when its metric >= the current model's minus this, both scored on
    # the same split of the run's data (the evaluate step scores the current model too).
    tolerance: float = Field(0.0, ge=0, allow_inf_nan=False)
    # An absolute floor: a new model whose metric is below it is held back, a first one too; null: none.
    min_value: Optional[float] = Field(None, allow_inf_nan=False)


class Run(_Strict):
    """How `showtell run` guards its run_root."""

    # A run lock whose heartbeat (refreshed every fifth of this) is older than this many seconds
    # is stale and taken over; a lock of a dead process on the same host is stale at once.
    lock_stale_seconds: float = Field(600.0, gt=0)


def _redact_credentials(value: Any) -> Any:
    """An endpoint URL's user and password blanked out before it is checked, so no error message
    (they quote the value) can echo a secret."""
    if isinstance(value, str) and "@" in value.partition("://")[2].split("/", 1)[0]:
        scheme, _, rest = value.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return value


def _endpoint_url(value: Optional[str]) -> Optional[str]:
    """An object store endpoint: http(s)://host[:port], no credentials, no path."""
    if value is None:
        return value
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https") or not rest.strip("/"):
        raise ValueError("expected http://host:port or https://host")
    if "@" in rest:
        raise ValueError("must not carry credentials: use the store's usual settings (AWS_PROFILE, ...)")
    if "/" in rest.rstrip("/") or "?" in rest:
        raise ValueError("expected no path after the host")
    return value.rstrip("/")


EndpointUrl = Annotated[Optional[str], AfterValidator(_endpoint_url), BeforeValidator(_redact_credentials)]


class S3Store(_Strict):
    """s3:// and S3-compatible servers (MinIO, Ceph, ...). Each null leaves AWS's usual settings in
    charge (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_REGION, ~/.aws, an instance role). No field holds a
    secret: keys stay in the environment or a profile."""

    # The S3 API's base URL, e.g. http://127.0.0.1:9000 for MinIO; null: AWS_ENDPOINT_URL_S3 or
    # AWS_ENDPOINT_URL, else AWS's own.
    endpoint_url: EndpointUrl = None
    # A profile of ~/.aws/config and ~/.aws/credentials; null: AWS_PROFILE, else AWS's default chain.
    profile: Optional[str] = None
    # The buckets' region, e.g. eu-west-1; null: AWS_REGION / AWS_DEFAULT_REGION, else the profile's.
    region: Optional[str] = None


class GcsStore(_Strict):
    """gs://. Each null leaves Google's usual settings in charge (STORAGE_EMULATOR_HOST, the
    application default credentials)."""

    # The JSON API's base URL, e.g. http://127.0.0.1:9023 for an emulator; null: STORAGE_EMULATOR_HOST,
    # else https://storage.googleapis.com.
    endpoint: EndpointUrl = None
    # The Google Cloud project requests are billed to; null: GOOGLE_CLOUD_PROJECT, else the credentials'.
    project: Optional[str] = None
    # true: no credentials (public buckets, emulators); false: the application default credentials;
    # null: anonymous at a custom endpoint (an emulator), else the application default credentials.
    anonymous: Optional[bool] = None


class Storage(_Strict):
    """Where the object stores are and how showtell signs in to them (schemas/stores.py). It changes
    where the data is read and written, never what: no step's fingerprint includes it."""

    s3: S3Store = S3Store()  # s3:// endpoint, profile and region
    gcs: GcsStore = GcsStore()  # gs:// endpoint, project and anonymous access
    # Seconds a store's endpoint gets to accept a connection: an unreachable one fails the command
    # after this, naming the endpoint.
    connect_timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)


class Kfp(_Strict):
    """`showtell export-pipeline kfp`: the run as a Kubeflow Pipelines v2 pipeline, one container per step."""

    image: str = "showtell:latest"  # the container image every step runs in (built from the repo's Dockerfile)
    pipeline_name: str = "showtell"  # the pipeline's name in Kubeflow
    # Where the steps' containers read this config: a URL they can reach (gs://, s3://, ...); it
    # is the pipeline's `config` parameter's default. Null: the --config path as given.
    config_url: Optional[str] = None
    train_accelerator: Optional[str] = None  # accelerator type of the training steps, e.g. nvidia.com/gpu; null: none
    train_accelerator_count: int = Field(1, gt=0)  # accelerators per training step, when train_accelerator is set
    cpu_limit: Optional[str] = None  # CPU limit of every step, e.g. 8 or 500m; null: the cluster's default
    memory_limit: Optional[str] = None  # memory limit of every step, e.g. 32G; null: the cluster's default

    @field_validator("cpu_limit", mode="before")
    @classmethod
    def _cores_as_text(cls, value: Any) -> Any:
        # YAML reads `8` as a number; Kubernetes quantities are text.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class Config(_Strict):
    run_root: str  # fsspec URL every step writes under (a local path, gs://..., s3://...)
    data: Data = Data()  # where data comes from and how records are written
    checks: Checks = Checks()  # the data checks that stop a run before training (thresholds; null: off)
    beam: Beam = Beam()  # how Beam pipelines run
    model: Model = Model()  # the captioner
    train: Train = Train()  # the two training phases
    ray: Ray = Ray()  # where and how wide training runs
    eval: Eval = Eval()  # how checkpoints are evaluated
    kfp: Kfp = Kfp()  # the run as a Kubeflow pipeline (`showtell export-pipeline kfp`)
    promote: Promote = Promote()  # which model is pushed to promote.models_root
    run: Run = Run()  # how `showtell run` locks its run_root
    storage: Storage = Storage()  # object stores' endpoints and sign-in (overrides their usual settings)

    @model_validator(mode="after")
    def _resolve_paths(self) -> "Config":
        if self.data.mirror is None:
            self.data.mirror = join_url(self.run_root, "raw")
        return self

    @model_validator(mode="after")
    def _cache_needs_saved_encoder_weights(self) -> "Config":
        if self.train.phase1.feature_cache.enabled and self.model.encoder_weights == "none":
            raise ValueError(
                "train.phase1.feature_cache.enabled needs model.encoder_weights `imagenet` or a weights URL, "
                "not `none`: a random encoder is drawn afresh by every process, so the features would not "
                "be the trained model's"
            )
        return self

    @property
    def data_dir(self) -> str:
        """`<run_root>/data`: shards, word_counts.txt, transform_fn/, preprocess_report.json."""
        return join_url(self.run_root, "data")

    @property
    def train_dir(self) -> str:
        """`<run_root>/train`: Ray's storage, and phase{1,2}/final/ + history.jsonl per phase."""
        return join_url(self.run_root, "train")

    @property
    def feature_cache_dir(self) -> str:
        """`<run_root>/feature_cache`: phase 1's encoder features (train.phase1.feature_cache), by the data."""
        return join_url(self.run_root, "feature_cache")

    @property
    def eval_dir(self) -> str:
        """`<run_root>/eval`: report.json, report.html, best.json."""
        return join_url(self.run_root, "eval")


def join_url(base: str, *parts: str) -> str:
    """Joins path parts onto a local path or URL with '/', whatever the OS."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for i, key in enumerate(keys[:-1]):
        if node.get(key) is None:  # absent, or a YAML section left empty (`data:`)
            node[key] = {}
        child = node[key]
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value read as a YAML scalar or list (`3`, `true`, `[x, y]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. data.shards.train=16")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def describe_errors(
    error: ValidationError, model: Optional[type[BaseModel]] = None, name: Callable[[str], str] = lambda key: key
) -> str:
    """pydantic's errors as one line, each problem naming its dotted key as `name(key)` says (a
    config key, or the CLI flag that mirrors it). A field of `model` whose `description` states
    its limit in words is reported in those words. Every ConfigError about values is worded here:

        describe_errors(error)                       # data.shards.train: Input should be greater than 0 (got 0)
        describe_errors(error, SampleData)           # image_size must be an integer from 32 to 1024, got 8
        describe_errors(error, name=lambda key: f"--{key} (eval.{key})")  # --beam_size (eval.beam_size): ...
    """
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        field = model.model_fields.get(key) if model is not None else None
        if not key and "error" in item.get("ctx", {}):  # the model's own check: its message says it all
            problems.append(str(item["ctx"]["error"]))
        elif item["type"] == "extra_forbidden":
            problems.append(f"{name(key)}: unknown key")
        elif item["type"] == "missing":
            problems.append(f"{name(key)}: required key is missing")
        elif field is not None and field.description:
            problems.append(f"{name(key)} must be {field.description}, got {item.get('input')!r}")
        else:
            problems.append(f"{name(key) if key else '(top level)'}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(problems)


def build_config(tree: dict[str, Any], overrides: tuple[str, ...] | list[str] = (), origin: str = "config") -> Config:
    """Validates a config tree after applying `a.b=value` overrides; raises ConfigError naming the key."""
    tree = yaml.safe_load(yaml.safe_dump(tree or {}))  # a deep copy we can mutate
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {describe_errors(error)}") from None


def load_config(path: str | os.PathLike, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Reads a YAML config file (any fsspec URL) and validates it with `overrides` applied."""
    import fsspec

    try:
        with fsspec.open(str(path), "r", encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as error:  # a directory, no permission, ...
        raise ConfigError(f"{path}: cannot read config file ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return build_config(tree or {}, overrides, origin=str(path))


def load_dated_config(
    path: str | os.PathLike, overrides: tuple[str, ...] | list[str] = (), date: Optional[str] = None
) -> Config:
    """`load_config`, then `{date}` in every string value (overrides included) replaced by the UTC
    day of `date` (`schemas.dates.run_day`; default: today). `showtell run` and `showtell status`
    load their config this way, so that a nightly config names one run_root per day; other
    subcommands use `load_config` and leave `{date}` as it is.

        # run_root: gs://b/showtell/runs/{date}
        load_dated_config("nightly.yaml", date="2025-01-31T02:00:07Z").run_root
        # -> "gs://b/showtell/runs/2025-01-31"
    """
    config = load_config(path, overrides)
    tree = config.model_dump(mode="json")
    day = run_day(date)
    if DATE_FIELD not in json.dumps(tree):
        return config
    return build_config(fill_date(tree, day), origin=str(path))
