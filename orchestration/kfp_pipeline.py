"""`showtell export-pipeline kfp OUT.yaml`: `showtell run` as a Kubeflow Pipelines v2 pipeline.

One container component per step of `showtell run` (orchestration/steps.py), in the same order,
each running the same CLI in `kfp.image`:

    download -> baseline -> preprocess -> check-data -> train-phase1 -> train-phase2 -> evaluate
    -> export -> promote
    each:  showtell run --config <config> --until <step> --date <the job's creation time>

A run that ends early (the baseline step: no new data since the promoted model) ends every later
component too: each one's `showtell run` finds the baseline step done and ends there again, with
exit 0, so the job succeeds having trained nothing.

`--until` makes every component idempotent: the steps before it are already done (the manifest
at run_root says so and they are skipped), so each component does its own step, and a retried
or re-submitted pipeline resumes where the last one stopped, as `showtell run` does. KFP's own
result caching is turned off for the same reason: whether a step is up to date is the
manifest's call (config keys + input checksums), not KFP's (the same parameter string).

Every step gets the pipeline job's creation time as `--date`, so a `{date}` run_root names one
folder for the whole job even when it runs past midnight. The pipeline has one parameter, `config`:
the URL of the config file the containers read (`kfp.config_url`, or the --config path as given).
Every path in it must be reachable from the cluster (gs://, s3://, ...). Training steps get
`kfp.train_accelerator`; every step gets `kfp.cpu_limit` / `kfp.memory_limit` when set.
"""

# No `from __future__ import annotations`: KFP reads the component functions' annotations as types.
import logging
from typing import Callable

from orchestration.steps import STEP_NAMES
from schemas.config import Config, Kfp
from schemas.errors import ShowtellError
from schemas.storage import is_local

log = logging.getLogger("showtell.kfp")

TRAINING_STEPS = ("train-phase1", "train-phase2")


def step_component(step: str, image: str) -> Callable:
    """A KFP container component running `showtell run --config <config> --until <step> --date <date>` in `image`."""
    from kfp import dsl

    def component(config: str, date: str):
        args = ["run", "--config", config, "--until", step, "--date", date]
        return dsl.ContainerSpec(image=image, command=["showtell"], args=args)

    component.__name__ = "showtell_" + step.replace("-", "_")  # the component's name in the pipeline
    component.__doc__ = f"showtell's `{step}` step (and any earlier one not yet done)."
    return dsl.container_component(component)


def build_kfp_pipeline(settings: Kfp, config_url: str) -> Callable:
    """The pipeline function: every step of `showtell run` as a task, each after the one before."""
    from kfp import dsl

    components = {step: step_component(step, settings.image) for step in STEP_NAMES}

    @dsl.pipeline(
        name=settings.pipeline_name,
        description="Show and Tell: data, two training phases, evaluation, export, promotion",
    )
    def showtell_pipeline(config: str = config_url):
        previous = None
        for step in STEP_NAMES:
            task = components[step](config=config, date=dsl.PIPELINE_JOB_CREATE_TIME_UTC_PLACEHOLDER)
            task.set_display_name(step)
            task.set_caching_options(False)
            if settings.cpu_limit:
                task.set_cpu_limit(settings.cpu_limit)
            if settings.memory_limit:
                task.set_memory_limit(settings.memory_limit)
            if step in TRAINING_STEPS and settings.train_accelerator:
                task.set_accelerator_type(settings.train_accelerator)
                task.set_accelerator_limit(settings.train_accelerator_count)
            if previous is not None:
                task.after(previous)
            previous = task

    return showtell_pipeline


def compile_kfp_pipeline(config: Config, config_path: str, out: str) -> str:
    """Compiles the pipeline of `config` to the YAML file `out`; returns `out`.

    `config_path` is the --config given; `kfp.config_url`, when set, is used instead.
    """
    try:
        from kfp import compiler
    except ImportError:
        raise ShowtellError("the kfp package is not installed: pip install 'showtell[kfp]'") from None
    config_url = config.kfp.config_url or config_path
    for name, url in (("the config", config_url), ("run_root", config.run_root)):
        if is_local(url):
            log.warning(
                "%s is a local path (%s): the pipeline's containers will not see it; use a bucket URL", name, url
            )
    pipeline = build_kfp_pipeline(config.kfp, config_url)
    compiler.Compiler().compile(pipeline, out)
    return out
