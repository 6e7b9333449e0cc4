"""The loop each Ray Train worker runs: MultiWorkerMirroredStrategy and a custom `strategy.run` step.

`train_loop_per_worker` reads like Ray's examples: strategy, data, model, optimizer, restore, loop.
The helpers below it hold the details:

- One step (`make_train_step`) follows im2txt: the loss is the cross-entropy averaged over the real
  words of the whole global batch (word and loss sums all-reduced), the gradient of that mean is
  all-reduced once, clipped by its global norm, and applied. (Keras' optimizer would all-reduce
  again and clip per replica: `trainer.optimizer`'s `PreReducedSGD` turns its own all-reduce off.)
- Every `checkpoint_every` steps and at the last step all workers call `ray.train.report` (a
  barrier in Ray Train v2); rank 0 alone attaches the checkpoint, then rewrites history.jsonl and
  writes TensorBoard scalars. A report only happens after every step's loss was finite: a NaN or
  inf loss ends the loop on every worker at once (the loss is all-reduced, so all see it) with
  `{"error": ...}` as the return value and no checkpoint, and the launcher turns that into an error.
- A fresh phase 1 with `encoder_pretrain_steps` first pretrains the encoder on caption words
  (`trainer.encoder_pretrain`); a resumed one already holds that encoder in its checkpoint.
- Rank 0 reports every step to the driver's progress display (`schemas.progress`): the phase's
  step (after phase 1's encoder pretraining steps, which the display counts first), its loss and
  examples/s. Other ranks report nothing.
- With `train.max_minutes`, after every step the workers all-reduce whether any is past the
  phase's deadline (set by the driver when the phase starts); once one is, all report that step
  with its checkpoint and stop, its state.json saying `stopped: max_minutes`.
- With `train.phase1.feature_cache`, phase 1 reads the frozen encoder's cached features
  (`pipelines.feature_cache`) instead of images; the model is the whole captioner all the same
  (its encoder, frozen, holds the weights the features came from), so its checkpoints are.
- Restore order: Ray's latest checkpoint of this phase (weights, optimizer, step, history; refused
  when it was trained on another vocabulary than the data's), else for phase 2 the published
  weights it starts from (phase 1's `final/`, or a warm start's `train/warm_start/`), else fresh.
  The data pipeline is not restored: a resumed run reshuffles with a seed that includes the step
  it resumed from.

The parts with a job of their own have modules of their own: the optimizer (`trainer.optimizer`),
the batch-norm statistics averaging (`trainer.batch_norm_sync`) and the TensorBoard scalars
(`trainer.tensorboard_writer`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import tempfile
import time
from typing import Optional

from schemas import progress
from schemas.config import Config, join_url
from schemas.errors import ShowtellError
from schemas.layout import HISTORY_FILE, TENSORBOARD_DIR, WEIGHTS_FILE
from trainer import checkpoints as ckpt
from trainer.batch_norm_sync import make_statistics_sync
from trainer.optimizer import make_optimizer
from trainer.tensorboard_writer import TensorBoardWriter

log = logging.getLogger("showtell.train")

MAX_MINUTES = "max_minutes"  # state.json's `stopped` when train.max_minutes ended a phase early


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, resolved by the launcher: plain values, picklable."""

    config: dict  # the whole Config, as JSON-able values (`Config.model_dump(mode="json")`)
    phase: int  # 1 or 2
    data_dir: str  # absolute path or URL of the preprocessed records
    phase_dir: str  # `<run_root>/train/phaseN`: history.jsonl, tensorboard/, Ray's checkpoints
    vocab_size: int
    vocabulary_id: str  # `schemas.vocabulary.vocabulary_id` of the data's word_counts.txt: recorded in every checkpoint
    global_batch: int  # per-worker batch x workers
    steps_per_epoch: float  # examples per epoch / global batch (for the learning-rate decay)
    init_dir: Optional[str] = None  # phase 2: phase 1's final/ or train/warm_start/ (only when no checkpoint exists)
    init_fingerprint: Optional[str] = None  # phase 1's final weights fingerprint, to check the load
    deadline: Optional[float] = None  # train.max_minutes from the phase's start, as time.time(); None: no limit
    feature_cache_dir: Optional[str] = None  # phase 1 from cached encoder features: `<run_root>/feature_cache`
    feature_size: int = 0  # the cached features' width (the encoder's pooled output), with feature_cache_dir

    @functools.cached_property
    def cfg(self) -> Config:
        return Config.model_validate(self.config)

    @functools.cached_property
    def phase_cfg(self):
        return self.cfg.train.phase(self.phase)

    @property
    def pretrain_steps(self) -> int:
        """Encoder pretraining steps a fresh phase 1 takes before its own (0 for phase 2); the
        phase's progress display counts them first."""
        return self.phase_cfg.encoder_pretrain_steps if self.phase == 1 else 0


@dataclasses.dataclass
class TrainState:
    """The loop's own state, saved in every checkpoint's state.json."""

    step: int = 0  # optimizer steps taken in this phase
    history: list = dataclasses.field(default_factory=list)  # every report so far, in order
    resumed_from_step: int = 0  # the step this attempt started from (0: a fresh start)
    init_fingerprint: Optional[str] = None  # phase 2: fingerprint of the weights it started from
    stopped: Optional[str] = None  # MAX_MINUTES when train.max_minutes ended the phase before its steps


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's entry point on each worker; `config` is a `TrainJob` as a dict."""
    import ray.train
    import tensorflow as tf

    from trainer.encoder_pretrain import pretrain_encoder

    job = TrainJob(**config)
    rank = ray.train.get_context().get_world_rank()
    setup_worker(job, rank)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    nodes = worker_nodes(strategy)  # where this attempt's workers run, recorded in every report
    checkpoint = ray.train.get_checkpoint()  # the latest of this phase, after a restart or a re-run
    with strategy.scope():
        model = build_worker_model(job, pretrained=checkpoint is None and job.init_dir is None)
        optimizer = make_optimizer(job.phase_cfg, job.steps_per_epoch, job.cfg.train.mixed_precision, model)
    state = restore(job, model, optimizer, checkpoint)
    batches = iter(distributed_dataset(strategy, job, state.step))
    sync_statistics = make_statistics_sync(strategy, model)
    if checkpoint is None and job.pretrain_steps:
        try:
            pretrain_encoder(strategy, model, batches, steps=job.phase_cfg.encoder_pretrain_steps,
                             learning_rate=job.phase_cfg.encoder_pretrain_learning_rate, vocab_size=job.vocab_size,
                             log_progress=rank == 0)
        except ShowtellError as error:  # a non-finite loss: every worker sees the same reduced one
            return {"error": f"phase 1: {error}; no checkpoint was kept or published", "step": 0}
        sync_statistics()
    train_step = make_train_step(strategy, model, optimizer, job)
    out_of_time = make_deadline_check(strategy, job.deadline)
    reporter = Reporter(job, state, rank, nodes)
    if rank == 0:  # where this attempt starts: the rate counts from here
        progress.advance(at=job.pretrain_steps + state.step)
    while state.step < job.phase_cfg.steps and not state.stopped:
        loss, grad_norm = train_step(batches)
        state.step += 1
        error = reporter.record_step(state.step, float(loss), float(grad_norm))
        if error:  # every worker sees the same all-reduced loss, so all stop here, none reports
            reporter.close()
            return {"error": error, "step": state.step}
        state.stopped = MAX_MINUTES if out_of_time() else None  # every worker gets the same answer
        if reporter.is_due(state.step) or state.stopped:
            if job.phase_cfg.train_encoder:
                sync_statistics()
            reporter.report(model, optimizer)
    reporter.close()
    return {"step": state.step, "stopped": state.stopped}


# --- setup ----------------------------------------------------------------------------------------


def setup_worker(job: TrainJob, rank: int) -> None:
    """Mixed precision, seeds and logging for this worker process; before any model is built.

    Each rank seeds its own image augmentation. Initial weights (and Keras' dropout seed state)
    are equal on every worker anyway: MultiWorkerMirroredStrategy broadcasts them from the chief.

    TensorFlow's ops run on as many threads as the CPUs Ray gave the worker (1 unless
    `ray.resources_per_worker` says more), not on every core of the machine: the input pipeline
    has threads of its own, and a second worker shares the machine. On 2 cores the demo's phase 1
    ran 1.6x faster so (benchmarks/train_bench.py --framework-tax).
    """
    import keras
    import ray
    import tensorflow as tf

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    tf.config.threading.set_intra_op_parallelism_threads(max(1, int(cpus)))

    policy = {"off": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[job.cfg.train.mixed_precision]
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(job.cfg.train.seed * 1009 + rank)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


def worker_nodes(strategy) -> list[str]:
    """Each worker's Ray node id, in rank order, on every worker (one all-gather of the ids' bytes)."""
    import ray.train
    import tensorflow as tf

    node = ray.get_runtime_context().get_node_id().encode().ljust(64)
    local = tf.constant([list(node)], tf.int32)
    gather = tf.function(lambda: strategy.run(lambda: tf.distribute.get_replica_context().all_gather(local, axis=0)))
    rows = strategy.experimental_local_results(gather())[0].numpy()
    replicas_per_worker = len(rows) // ray.train.get_context().get_world_size()
    return [bytes(row.tolist()).decode().strip() for row in rows[::replicas_per_worker]]


def make_deadline_check(strategy, deadline: Optional[float]):
    """`out_of_time() -> bool`: whether any worker's clock is past `deadline` (one all-reduce of a
    flag, so every worker stops at the same step); always False without a deadline."""
    if deadline is None:
        return lambda: False
    import tensorflow as tf

    def replica_sum(flag):
        # tf.identity: the collective needs a tensor placed on the replica's device, not the input itself.
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(flag))

    @tf.function
    def workers_past(flag):
        return strategy.experimental_local_results(strategy.run(replica_sum, args=(flag,)))[0]

    return lambda: bool(workers_past(tf.constant(float(time.time() > deadline))) > 0)


def distributed_dataset(strategy, job: TrainJob, start_step: int):
    """Each worker reads its share of the train shards; per-replica batch = global batch / replicas.

    The shuffle seed mixes in the step a resumed run starts from, so a restart does not replay the
    batches the lost run already saw. With a feature cache, the cache's shards stand in for the
    data's: batches of features instead of images (`trainer.inputs.make_feature_dataset`).
    """
    from trainer.inputs import make_dataset, make_feature_dataset, shard_files

    seed = job.cfg.train.seed + start_step
    cached = job.feature_cache_dir is not None
    files = shard_files(job.feature_cache_dir if cached else job.data_dir, "train")

    def dataset_fn(input_context):
        common = {
            "batch_size": input_context.get_per_replica_batch_size(job.global_batch),
            "training": True,
            "seed": seed,
            "shuffle_buffer": job.cfg.train.shuffle_buffer,
            "input_context": input_context,
            "shard_cache_config": job.cfg.train.shard_cache,
        }
        if cached:
            return make_feature_dataset(files, feature_size=job.feature_size, **common)
        return make_dataset(
            files, image_size=job.cfg.model.image_size, random_flip=job.cfg.train.random_flip, **common
        )

    return strategy.distribute_datasets_from_function(dataset_fn)


def build_worker_model(job: TrainJob, pretrained: bool):
    """The captioner, with the encoder trainable or frozen as the phase says. Encoder weights
    (e.g. ImageNet's download) are loaded only when nothing is restored over them."""
    from trainer.model import build_model

    model_cfg = job.cfg.model
    if not pretrained:
        model_cfg = model_cfg.model_copy(update={"encoder_weights": "none"})
    model = build_model(model_cfg, job.vocab_size)
    model.set_encoder_trainable(job.phase_cfg.train_encoder)
    return model


def restore(job: TrainJob, model, optimizer, checkpoint) -> TrainState:
    """Ray's latest checkpoint of this phase, else phase 1's final weights (phase 2), else fresh.

    Every worker loads the same files, so every replica starts equal.
    """
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = ckpt.read_state(directory)
            if saved.get("vocabulary_id", job.vocabulary_id) != job.vocabulary_id:
                raise ShowtellError(
                    f"phase {job.phase}: its latest checkpoint was trained on vocabulary {saved['vocabulary_id']}, "
                    f"the data's is {job.vocabulary_id} (was the data preprocessed again?): train the phase "
                    "afresh (`showtell run` does when the data changed)"
                )
            saved = ckpt.load_checkpoint(directory, model, optimizer)
        state = TrainState(
            step=int(saved["step"]),
            history=list(saved.get("history", [])),
            resumed_from_step=int(saved["step"]),
            init_fingerprint=saved.get("init_fingerprint"),
        )
        log.info("phase %d: resumed from step %d", job.phase, state.step)
    elif job.init_dir is not None:
        with tempfile.TemporaryDirectory(prefix="showtell-init-") as scratch:
            model.load_weights(os.path.join(ckpt.fetch_dir(job.init_dir, scratch), WEIGHTS_FILE))
        fingerprint = ckpt.weights_fingerprint(model)
        if job.init_fingerprint and fingerprint != job.init_fingerprint:
            raise ShowtellError(f"weights loaded from {job.init_dir} do not match its state.json fingerprint")
        state = TrainState(init_fingerprint=fingerprint)
        log.info("phase %d: starting from %s", job.phase, job.init_dir)
    else:
        state = TrainState()
    if rank == 0:  # drop rows of a lost attempt (after the checkpoint we resume from)
        ckpt.write_text(join_url(job.phase_dir, HISTORY_FILE), ckpt.history_text(state.history))
    return state


# --- the step -------------------------------------------------------------------------------------


def make_train_step(strategy, model, optimizer, job: TrainJob):
    """`train_step(iterator) -> (mean loss over the global batch's words, gradient global norm)`."""
    import keras
    import tensorflow as tf

    from trainer.ops import clip_by_global_norm, masked_cross_entropy

    variables = model.trainable_variables
    clip_norm = job.phase_cfg.clip_gradients
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    @tf.function(jit_compile=job.cfg.train.xla)
    def local_gradients(features, targets, mask):
        # Forward and backward of this replica's batch, no collectives (so XLA may compile it):
        # gradients of this replica's mean word loss, scaled for fp16 when a loss scale is on.
        with tf.GradientTape() as tape:
            logits = model(features, training=True)
            loss_sum, words = masked_cross_entropy(logits, targets, mask)
            local_mean = loss_sum / tf.maximum(words, 1.0)
            scaled = optimizer.scale_loss(local_mean)
        return loss_sum, words, tape.gradient(scaled, variables)

    def replica_step(features, targets, mask):
        context = tf.distribute.get_replica_context()
        loss_sum, words, grads = local_gradients(features, targets, mask)
        global_words = tf.maximum(context.all_reduce(tf.distribute.ReduceOp.SUM, words), 1.0)
        # sum over replicas of (local mean gradient x local words / global words) = gradient of the
        # global mean: one all-reduce of the gradients, then clip that global gradient.
        share = words / global_words
        grads = context.all_reduce(tf.distribute.ReduceOp.SUM, [g * tf.cast(share, g.dtype) for g in grads])
        scale = tf.cast(optimizer.dynamic_scale, tf.float32) if loss_scaled else 1.0
        grads, norm = clip_by_global_norm(grads, clip_norm * scale)
        optimizer.apply_gradients(zip(grads, variables))
        return loss_sum / global_words, norm / scale

    @tf.function
    def train_step(iterator):
        features, targets, mask = next(iterator)
        loss, norm = strategy.run(replica_step, args=(features, targets, mask))
        reduce = tf.distribute.ReduceOp
        return strategy.reduce(reduce.SUM, loss, axis=None), strategy.reduce(reduce.MEAN, norm, axis=None)

    return train_step


# --- reports --------------------------------------------------------------------------------------


class Reporter:
    """Per-step loss bookkeeping, and the every-`checkpoint_every` report: metrics from every
    worker (Ray's barrier), the checkpoint from rank 0, then history.jsonl and TensorBoard."""

    def __init__(self, job: TrainJob, state: TrainState, rank: int, nodes: list[str]):
        self.job, self.state, self.rank, self.nodes = job, state, rank, nodes
        self.phase_cfg = job.phase_cfg
        self._losses: list[float] = []
        self._norms: list[float] = []
        self._since = time.time()
        self._tensorboard = TensorBoardWriter(join_url(job.phase_dir, TENSORBOARD_DIR)) if rank == 0 else None

    def record_step(self, step: int, loss: float, grad_norm: float) -> Optional[str]:
        """Keeps the step's loss; returns an error message if it is not finite. Rank 0 shows the
        step on the progress display, with the mean loss and examples/s since the last report."""
        if not math.isfinite(loss):
            lr = _learning_rate(self.job, step - 1)
            return (
                f"phase {self.job.phase}: loss is {loss} at step {step} (learning rate {lr:g}); "
                f"training stopped, no checkpoint of this step was kept or published"
            )
        self._losses.append(loss)
        self._norms.append(grad_norm)
        if self.rank == 0:
            examples_per_sec = self.job.global_batch * len(self._losses) / max(time.time() - self._since, 1e-9)
            progress.advance(
                at=self.job.pretrain_steps + step,
                loss=sum(self._losses) / len(self._losses),
                **{"examples/s": examples_per_sec},
            )
        return None

    def is_due(self, step: int) -> bool:
        return step % self.phase_cfg.checkpoint_every == 0 or step == self.phase_cfg.steps

    def report(self, model, optimizer) -> None:
        import ray.train

        state = self.state
        now = time.time()
        loss = sum(self._losses) / len(self._losses)
        row = {
            "step": state.step,
            "loss": loss,
            "perplexity": _perplexity(loss),
            "learning_rate": _learning_rate(self.job, state.step - 1),  # the rate of the last step taken
            "examples_per_sec": self.job.global_batch * len(self._losses) / max(now - self._since, 1e-9),
            "wall_time": now,
            "grad_norm": sum(self._norms) / len(self._norms),
            "resumed_from_step": state.resumed_from_step,
            "node_ids": self.nodes,  # each rank's Ray node id, in rank order
        }
        state.history.append(row)
        with tempfile.TemporaryDirectory(prefix="showtell-ckpt-") as directory:
            checkpoint = None
            if self.rank == 0:
                ckpt.save_checkpoint(directory, model, optimizer, self._checkpoint_state(model))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(
                {**row, "phase": self.job.phase},
                checkpoint=checkpoint,
                checkpoint_dir_name=f"checkpoint_{state.step:09d}",
            )
        if self.rank == 0:  # after the report: Ray holds the checkpoint with this row (committed at its next poll)
            ckpt.write_text(join_url(self.job.phase_dir, HISTORY_FILE), ckpt.history_text(state.history))
            self._tensorboard.write(row)
        self._losses, self._norms, self._since = [], [], time.time()

    def _checkpoint_state(self, model) -> dict:
        state = self.state
        return {
            "phase": self.job.phase,
            "step": state.step,
            "fingerprint": ckpt.weights_fingerprint(model),
            "init_fingerprint": state.init_fingerprint,
            "stopped": state.stopped,
            "vocab_size": self.job.vocab_size,
            "vocabulary_id": self.job.vocabulary_id,
            "global_batch": self.job.global_batch,
            "metrics": state.history[-1],
            "history": state.history,
        }

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _learning_rate(job: TrainJob, step: int) -> float:
    from trainer.ops import learning_rate

    return float(learning_rate(max(step, 0), job.phase_cfg, job.steps_per_epoch))


def _perplexity(loss: float) -> float:
    from trainer.ops import perplexity

    return float(perplexity(loss))
