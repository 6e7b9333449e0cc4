"""`showtell train`: one training phase on Ray Train's TensorflowTrainer, from the driver's side.

    plan = plan_phase(config, phase)      # checks inputs, resolves paths, batch and epoch size
    summary = run_phase(config, phase)    # Ray cluster -> TensorflowTrainer.fit() -> publish final/

The per-worker loop is `trainer.train_loop.train_loop_per_worker`. The run's storage is
`<run_root>/train/` (`RunConfig(storage_path)`), its name `phase1`/`phase2`; a re-run of a phase
with the same names resumes from Ray's latest checkpoint there, and a phase whose `final/` already
holds `train.phaseN.steps` steps is not run again. After `fit`, the driver publishes Ray's latest
checkpoint as `<run_root>/train/phaseN/final/` (see `trainer.checkpoints`).

With `train.init_from` naming a model (`trainer.warm_start`), phase 1 trains nothing: it remaps
that model to the data's vocabulary into `<run_root>/train/warm_start/`, and phase 2 fine-tunes
from there for `train.warm_start_steps` steps, within `train.max_minutes` of wall-clock time from
when `run_phase` starts it (it then publishes the step it stopped at).

While `fit` runs, the driver shows the phase's progress display (`schemas.progress`): step out of
total (phase 1's encoder pretraining steps counted first), loss, examples/s and time left, as rank
0 reports them through the display's spool, named in the workers' runtime_env. `ProgressLine`
prints a line per report on Ray's controller, which goes where Ray's output goes (under
`showtell run`, the step's log).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Any, Iterator, Optional

from ray.train import UserCallback

from schemas import progress, stores
from schemas.config import Config, join_url
from schemas.errors import ShowtellError
from schemas.layout import FEATURE_CACHE_FILE, FINAL_DIR, HISTORY_FILE, PREPROCESS_REPORT_FILE, STATE_FILE
from schemas.vocabulary import WORD_COUNTS_FILE, parse_word_counts
from trainer import checkpoints as ckpt
from trainer.train_loop import MAX_MINUTES, TrainJob, train_loop_per_worker
from trainer.warm_start import init_source, prepare_warm_start, recorded_fingerprint, training_config, warm_start_dir

log = logging.getLogger("showtell.train")


class TrainingDivergedError(ShowtellError):
    """The loss became NaN or infinite; the message names the phase and step."""


class TrainingFailed(RuntimeError):
    """A phase stopped for a reason that is not the user's: a worker died (or a node was lost)
    more often than `ray.max_failures` allows, or a bug. The CLI exits 1 for it."""


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    job: TrainJob  # what every worker gets
    phase_dir: str  # `<run_root>/train/phaseN`
    steps: int  # the phase's total steps


def plan_phase(config: Config, phase: int) -> PhasePlan:
    """Resolves and checks everything a phase needs before any worker starts."""
    from trainer.model import resolve_vocab_size

    config = training_config(config, phase)
    phase_cfg = config.train.phase(phase)
    run_root = ckpt.absolute(config.run_root)
    config = config.model_copy(update={"run_root": run_root})
    data_dir, train_dir = config.data_dir, config.train_dir
    report = ckpt.read_json(join_url(data_dir, PREPROCESS_REPORT_FILE))
    if report is None:
        raise ShowtellError(
            f"no preprocessed data at {data_dir} ({PREPROCESS_REPORT_FILE} missing): run `showtell preprocess` first"
        )
    word_counts = ckpt.read_text(join_url(data_dir, WORD_COUNTS_FILE))
    frozen_random_encoder = not phase_cfg.train_encoder and config.model.encoder_weights == "none"
    if phase == 1 and frozen_random_encoder and not phase_cfg.encoder_pretrain_steps:
        log.warning(
            "phase 1 freezes the encoder, but model.encoder_weights is `none`: a frozen random encoder "
            "gives every image the same features, so the captioner will not see the images. Use "
            "`imagenet` or a weights URL, set train.phase1.encoder_pretrain_steps, or set "
            "train.phase1.train_encoder=true."
        )
    global_batch = phase_cfg.batch_size * config.ray.num_workers
    _check_elastic(config, global_batch)
    examples = config.train.num_examples_per_epoch or int(report["splits"]["train"]["records_written"])
    if examples <= 0:
        raise ShowtellError(f"{join_url(data_dir, PREPROCESS_REPORT_FILE)}: no training records were written")
    vocabulary_id = parse_word_counts(word_counts).id
    init_dir = init_fingerprint = None
    if phase == 2:
        init_dir, init_fingerprint = _phase2_start(config, vocabulary_id)
    phase_dir = join_url(train_dir, ckpt.phase_name(phase))
    cache = _feature_cache(config) if phase == 1 and phase_cfg.feature_cache.enabled else None
    job = TrainJob(
        config=config.model_dump(mode="json"),
        phase=phase,
        data_dir=data_dir,
        phase_dir=phase_dir,
        vocab_size=resolve_vocab_size(config.model, word_counts),
        vocabulary_id=vocabulary_id,
        global_batch=global_batch,
        steps_per_epoch=examples / global_batch,
        init_dir=init_dir,
        init_fingerprint=init_fingerprint,
        deadline=_deadline(config, phase),
        feature_cache_dir=config.feature_cache_dir if cache else None,
        feature_size=cache["feature_size"] if cache else 0,
    )
    return PhasePlan(job=job, phase_dir=phase_dir, steps=phase_cfg.steps)


def _feature_cache(config: Config) -> dict:
    """The feature cache's cache.json, which phase 1 trains from when train.phase1.feature_cache is on."""
    recorded = ckpt.read_json(join_url(config.feature_cache_dir, FEATURE_CACHE_FILE))
    if recorded is None:
        raise ShowtellError(
            f"train.phase1.feature_cache is on, and {config.feature_cache_dir} holds no cache: "
            "`showtell train --phase 1` and `showtell run` build it first"
        )
    return recorded


def _deadline(config: Config, phase: int) -> Optional[float]:
    """When a warm-started fine-tune must stop (`train.max_minutes` from now), as time.time();
    None without a limit or a warm start."""
    if phase != 2 or not config.train.max_minutes or init_source(config) is None:
        return None
    return time.time() + 60 * config.train.max_minutes


def _phase2_start(config: Config, vocabulary_id: str) -> tuple[str, str]:
    """(folder, weights fingerprint) phase 2 starts from: a warm start's `train/warm_start/`, else
    phase 1's `final/`. Either must have been trained on (or remapped to) the data's vocabulary."""
    start, what, does = join_url(config.train_dir, ckpt.phase_name(1), FINAL_DIR), "phase 1's final checkpoint", ""
    if init_source(config) is not None:
        start, what = warm_start_dir(config), "the warm start"
        does = f" (with train.init_from {config.train.init_from!r} it prepares the warm start)"
    state = ckpt.read_json(join_url(start, STATE_FILE))
    if state is None:
        raise ShowtellError(
            f"phase 2 fine-tunes {what}, and {start} holds none: run `showtell train --phase 1` first{does}"
        )
    if state.get("vocabulary_id", vocabulary_id) != vocabulary_id:
        raise ShowtellError(
            f"phase 2 fine-tunes {what} ({start}), whose vocabulary {state['vocabulary_id']} is not the data's "
            f"({vocabulary_id}; was the data preprocessed again?): run `showtell train --phase 1` again{does}"
        )
    return start, state["fingerprint"]


def run_phase(config: Config, phase: int) -> dict:
    """Runs (or resumes) one phase and publishes its `final/`; returns a summary of the outcome.

    A phase whose `final/` already holds its configured steps is not run again (no Ray, no
    TensorFlow: a re-run is fast); a half-finished phase resumes from Ray's latest checkpoint.
    """
    if phase == 1 and init_source(config) is not None:
        return _warm_start(config)
    config = training_config(config, phase)
    phase_cfg = config.train.phase(phase)
    phase_dir = join_url(ckpt.absolute(config.train_dir), ckpt.phase_name(phase))
    published = ckpt.published_state(phase_dir)
    if published is not None and published["step"] >= phase_cfg.steps:
        log.info(
            "phase %d: %s/final already holds step %d of %d; nothing to do",
            phase, phase_dir, published["step"], phase_cfg.steps,
        )
        return _summary(phase, phase_dir, published, ran=False)
    plan = plan_phase(config, phase)
    started = time.time()
    display = progress.tracked(f"train phase {phase}", total=plan.job.pretrain_steps + plan.steps, unit="steps")
    with ray_cluster(plan.job.cfg), display as spool:
        result = _fit(plan, spool)
    outcome = result.return_value or {}
    if outcome.get("error"):
        raise TrainingDivergedError(outcome["error"])
    if result.checkpoint is None:
        raise ShowtellError(f"phase {phase}: Ray Train finished without a checkpoint under {plan.phase_dir}")
    with result.checkpoint.as_directory() as directory:
        state = ckpt.read_state(directory)
        if state["step"] < plan.steps and state.get("stopped") != MAX_MINUTES:
            raise ShowtellError(f"phase {phase}: the latest checkpoint holds step {state['step']}, not {plan.steps}")
        final = ckpt.publish_final(
            directory, plan.phase_dir, plan.job.config, join_url(plan.job.data_dir, WORD_COUNTS_FILE)
        )
    if state.get("stopped") == MAX_MINUTES:
        log.warning(
            "phase %d: stopped at step %d of %d, after train.max_minutes=%g; `showtell train --phase %d` trains on",
            phase, state["step"], plan.steps, plan.job.cfg.train.max_minutes, phase,
        )
    log.info("phase %d: published %s (step %d) in %.1f s", phase, final, state["step"], time.time() - started)
    return _summary(phase, plan.phase_dir, ckpt.published_state(plan.phase_dir), ran=True)


def _summary(phase: int, phase_dir: str, state: dict, ran: bool) -> dict:
    return {
        "phase": phase,
        "ran": ran,  # False: final/ was already complete
        "step": state["step"],
        "stopped": state.get("stopped"),  # `max_minutes` when train.max_minutes ended it early
        "final": join_url(phase_dir, FINAL_DIR),
        "history": join_url(phase_dir, HISTORY_FILE),
        "metrics": {k: state["metrics"].get(k) for k in ckpt.HISTORY_COLUMNS},
    }


def _warm_start(config: Config) -> dict:
    """Phase 1 of a warm-started run: no training, the initial model remapped to the data's
    vocabulary into `train/warm_start/` (kept when it already holds this very model, by its weights
    fingerprint, for this vocabulary)."""
    source = init_source(config)
    vocabulary_id = parse_word_counts(ckpt.read_text(join_url(config.data_dir, WORD_COUNTS_FILE))).id
    state = ckpt.read_json(join_url(warm_start_dir(config), STATE_FILE))
    prepared_for = (source, recorded_fingerprint(source), vocabulary_id)
    ran = state is None or (state.get("init_from"), state.get("init_fingerprint"), state.get("vocabulary_id")) != (
        prepared_for
    )
    if ran:
        state = prepare_warm_start(config)
    else:
        log.info("phase 1: %s already holds the warm start from %s; nothing to do", warm_start_dir(config), source)
    return {
        "phase": 1,
        "ran": ran,
        "step": 0,
        "warm_start": {key: state[key] for key in ("init_from", "init_vocabulary_id", "vocabulary_id", "remap")},
        "final": warm_start_dir(config),
        "metrics": {},
    }


def _fit(plan: PhasePlan, progress_spool: Optional[str]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.tensorflow import TensorflowTrainer
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    cfg = plan.job.cfg
    phase_cfg = plan.job.phase_cfg
    storage_path, storage_filesystem = ray_storage(cfg.train_dir)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(plan.job),
        scaling_config=ScalingConfig(
            num_workers=(cfg.ray.min_workers, cfg.ray.num_workers) if cfg.ray.min_workers else cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker=dict(cfg.ray.resources_per_worker) or None,
        ),
        run_config=RunConfig(
            name=ckpt.phase_name(plan.job.phase),
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=phase_cfg.checkpoints_kept),
            failure_config=FailureConfig(
                max_failures=cfg.ray.max_failures, controller_failure_limit=_startup_attempts(cfg)
            ),
            callbacks=[ProgressLine(plan.job.phase, plan.steps)],
            worker_runtime_env={"env_vars": _worker_env(cfg, progress_spool)},
        ),
    )
    try:
        return trainer.fit()
    except TrainingFailedError as error:
        mistake = _users_mistake(error)
        if mistake is not None:
            raise ShowtellError(f"phase {plan.job.phase}: {mistake}") from error
        if isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
            raise TrainingFailed(  # after a worker or node was lost: nowhere to start the workers again
                f"phase {plan.job.phase}: Ray Train could not start the workers again within "
                f"ray.startup_timeout_s={cfg.ray.startup_timeout_s:g} s: the cluster cannot place {_asked(cfg)} "
                f"(it has {_has(worker_resources(cfg))}); was a node lost for good?"
            ) from error
        raise TrainingFailed(f"phase {plan.job.phase}: {_describe_failure(error)}") from error


def _check_elastic(config: Config, global_batch: int) -> None:
    """With `ray.min_workers`, every worker count Ray Train may pick must split the global batch."""
    low, high = config.ray.min_workers, config.ray.num_workers
    if low is None:
        return
    if low > high:
        raise ShowtellError(f"ray.min_workers ({low}) is more than ray.num_workers ({high})")
    uneven = [n for n in range(low, high + 1) if global_batch % n]
    if uneven:
        raise ShowtellError(
            f"ray.min_workers: the global batch of {global_batch} (ray.num_workers x batch_size) does not split "
            f"evenly over {', '.join(map(str, uneven))} workers, which elastic training may run"
        )


def _startup_attempts(config: Config) -> int:
    """How many times Ray Train may try to start the worker group (Ray's default: forever, each
    try waiting RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) before the phase fails: together about
    `ray.startup_timeout_s`, e.g. for a replacement node after a node was lost."""
    from ray.train.v2._internal.constants import (
        DEFAULT_WORKER_GROUP_START_TIMEOUT_S,
        WORKER_GROUP_START_TIMEOUT_S_ENV_VAR,
    )

    each = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, DEFAULT_WORKER_GROUP_START_TIMEOUT_S))
    return max(1, math.ceil(config.ray.startup_timeout_s / each))


def _worker_env(config: Config, progress_spool: Optional[str] = None) -> dict[str, str]:
    """Workers don't inherit the driver's environment: quiet TensorFlow's C++ logs there too, give
    them the config's store settings (`storage.*`: endpoints, timeouts, a profile name; no secret),
    and name the progress display's spool (`schemas.progress.SPOOL_ENV`) when there is one."""
    env = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    env.update(stores.exported_env(config.storage))
    if progress_spool is not None:
        env[progress.SPOOL_ENV] = progress_spool
    return env


def _worker_causes(error: Exception) -> list[tuple[int, BaseException]]:
    """(rank, the exception that ended it) for each failed worker of Ray's TrainingFailedError."""
    failures = getattr(error, "worker_failures", None) or {}
    return [(rank, getattr(failure, "cause", None) or failure) for rank, failure in sorted(failures.items())]


def _users_mistake(error: Exception) -> Optional[str]:
    """A worker's ShowtellError (bad data or config, seen by the worker), if that is what ended it."""
    return next((str(cause) for _, cause in _worker_causes(error) if isinstance(cause, ShowtellError)), None)


def _describe_failure(error: Exception) -> str:
    """One line out of Ray's TrainingFailedError: the last line of each worker's error (Ray has
    logged the tracebacks, in the step's log under `showtell run`)."""
    parts = []
    for rank, cause in _worker_causes(error):
        lines = [line for line in str(cause).splitlines() if line.strip()]
        parts.append(f"rank {rank}: {lines[-1] if lines else type(cause).__name__}")
    if not parts:
        lines = [line for line in str(error).splitlines() if line.strip()]
        parts = lines[-1:] or [type(error).__name__]
    return "training failed (" + "; ".join(parts) + ")"


def ray_storage(train_dir: str) -> tuple[str, Any]:
    """Ray's (storage_path, storage_filesystem): a local path as it is; s3:// and gs:// through a
    pyarrow file system at the endpoint, and with the credentials, that fsspec uses (the config's
    `storage` section as `schemas.stores.apply` set it, else the stores' usual settings: AWS,
    MinIO, GCS and an emulator alike); any other fsspec URL through an fsspec filesystem."""
    import fsspec

    protocol = fsspec.utils.get_protocol(train_dir)
    if protocol in ("file", "local"):
        return ckpt.absolute(train_dir), None
    if stores.store_of(train_dir) is not None:
        return stores.arrow_filesystem(train_dir)
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(train_dir)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


@contextlib.contextmanager
def ray_cluster(config: Config) -> Iterator[None]:
    """Connects to `ray.address`, or, when it is null, to the cluster in $RAY_ADDRESS (set by
    `ray job submit`), or else starts a local cluster sized for the workers and stops it after;
    an already initialised Ray (a notebook, a test) is used as it is, as a joined cluster.

    Before any worker starts, it checks that the cluster can take the workers: a local cluster
    without the resources asked for is refused at once; a joined one gets `ray.startup_timeout_s`
    to place them (an autoscaler may be adding nodes), and a local `run_root` is refused when
    workers may run on other nodes, unless `ray.shared_filesystem` says every node mounts it.
    """
    import ray

    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    runtime_env = {"env_vars": _worker_env(config)}
    if started and address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    elif started:
        per_worker = dict(config.ray.resources_per_worker)
        workers = config.ray.num_workers
        custom = {k: v * workers for k, v in per_worker.items() if k not in ("CPU", "GPU")}
        ray.init(
            num_cpus=max(1, int(round(per_worker.get("CPU", 1) * workers))),
            resources=custom or None,
            include_dashboard=False,
            runtime_env=runtime_env,
        )
    try:
        if started and not address:
            _check_local_resources(config)
        else:
            cluster = f"the Ray cluster at {address or ray.get_runtime_context().gcs_address}"
            _check_shared_run_root(config, cluster, client=str(address or "").startswith("ray://"))
            _wait_for_placement(config, cluster)
        yield
    finally:
        if started:
            ray.shutdown()


def worker_resources(config: Config) -> dict[str, float]:
    """What one training worker asks Ray for, filled in as Ray's ScalingConfig does: 1 CPU by
    default, 1 GPU (and no CPU) with `use_gpu`, `resources_per_worker` otherwise, plus 1 GPU with
    `use_gpu` when it names none."""
    per_worker = {k: float(v) for k, v in config.ray.resources_per_worker.items() if v}
    if not per_worker:
        per_worker = {"GPU": 1.0} if config.ray.use_gpu else {"CPU": 1.0}
    if config.ray.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    return per_worker


def _fewest_workers(config: Config) -> int:
    """The workers a phase cannot start without: `ray.min_workers` when training is elastic."""
    return config.ray.min_workers or config.ray.num_workers


def _resources_text(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _asked(config: Config) -> str:
    """What the workers ask for in all: `ray.min_workers` of them when training is elastic."""
    per_worker = worker_resources(config)
    workers = _fewest_workers(config)
    total = {k: v * workers for k, v in per_worker.items()}
    return f"{workers} training workers x {_resources_text(per_worker)} = {_resources_text(total)}"


def _has(per_worker: dict[str, float]) -> str:
    """The cluster's total of the resources a worker asks for (0 for those it lacks)."""
    import ray

    cluster = ray.cluster_resources()
    return _resources_text({k: cluster.get(k, 0.0) for k in per_worker})


def _check_local_resources(config: Config) -> None:
    """A local cluster has what this machine has: what it lacks now it will never get."""
    import ray

    per_worker = worker_resources(config)
    cluster = ray.cluster_resources()
    workers = _fewest_workers(config)
    short = sorted(k for k, v in per_worker.items() if v * workers > cluster.get(k, 0.0))
    if not short:
        return
    hint = "lower ray.num_workers or ray.resources_per_worker"
    if "GPU" in short:
        hint = "set ray.use_gpu=false, or join a cluster with GPUs through ray.address"
    raise ShowtellError(
        f"ray: {_asked(config)}, but the local Ray cluster on this machine has {_has(per_worker)} "
        f"(short of {', '.join(short)}): {hint}"
    )


def _check_shared_run_root(config: Config, cluster: str, client: bool) -> None:
    """A local run_root is on the driver's disk: workers on other nodes cannot reach it."""
    import fsspec
    import ray

    if config.ray.shared_filesystem or fsspec.utils.get_protocol(config.run_root) not in ("file", "local"):
        return
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if not client and nodes < 2:
        return
    where = "through Ray Client, on nodes other than this machine" if client else f"with {nodes} nodes"
    raise ShowtellError(
        f"run_root {config.run_root} is on this machine's disk, and training joins {cluster} {where}: "
        "training workers on other nodes cannot read or write it. Put run_root on s3:// or gs://, or, "
        "if every node mounts it at the same path (NFS, a shared volume), set ray.shared_filesystem=true"
    )


def _wait_for_placement(config: Config, cluster: str) -> None:
    """Waits up to `ray.startup_timeout_s` for the cluster to place the workers (as Ray Train
    will: one placement group of a bundle per worker), saying what it waits for."""
    from ray.util.placement_group import placement_group, remove_placement_group

    per_worker = worker_resources(config)
    timeout = config.ray.startup_timeout_s
    group = placement_group([per_worker] * _fewest_workers(config), strategy="PACK")
    try:
        if group.wait(timeout_seconds=min(1.0, timeout)):
            return
        log.info(
            "waiting up to %g s (ray.startup_timeout_s) for %s to place %s; it has %s now",
            timeout, cluster, _asked(config), _has(per_worker),
        )
        if not group.wait(timeout_seconds=max(timeout - 1.0, 0.0)):
            raise ShowtellError(
                f"ray: {cluster} could not place {_asked(config)} within ray.startup_timeout_s={timeout:g} s "
                f"(it has {_has(per_worker)}): lower ray.num_workers or ray.resources_per_worker, "
                "set ray.use_gpu=false, or add nodes"
            )
    finally:
        remove_placement_group(group)


class ProgressLine(UserCallback):
    """Prints one line per report: on Ray's controller, which sits on the driver's node and whose
    output Ray forwards to the driver's stdout (under `showtell run`, the step's log; the console
    shows the progress display instead)."""

    def __init__(self, phase: int, steps: int):
        self.phase, self.steps = phase, steps

    def after_report(self, run_context, metrics, checkpoint) -> None:
        row = metrics[0] if metrics else {}
        if "step" in row:
            print(format_progress(self.phase, self.steps, row), flush=True)


def format_progress(phase: int, steps: int, row: dict) -> str:
    return (
        f"phase {phase} step {row['step']}/{steps}  loss {row['loss']:.4f}  perplexity {row['perplexity']:.2f}  "
        f"lr {row['learning_rate']:.3g}  {row['examples_per_sec']:.1f} examples/s"
    )
