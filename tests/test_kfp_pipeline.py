"""orchestration/kfp_pipeline.py: `showtell export-pipeline kfp` compiles with the real kfp SDK,
and the compiled YAML holds one container task per step of `showtell run`, chained in order."""

from __future__ import annotations

import yaml

from orchestration.cli import main as cli_main
from orchestration.steps import STEP_NAMES


def _compile(tmp_path, *overrides: str) -> dict:
    config = tmp_path / "config.yaml"
    config.write_text("run_root: gs://bucket/showtell/run\nkfp:\n  image: registry.example/showtell:1.2\n")
    out = tmp_path / "pipeline.yaml"
    args = ["export-pipeline", "kfp", str(out), "--config", str(config)]
    assert cli_main([*args, *(arg for o in overrides for arg in ("--set", o))]) == 0
    return yaml.safe_load(out.read_text())


def _task_name(step: str) -> str:
    return "showtell-" + step.replace("_", "-")


def test_one_task_per_step_each_after_the_one_before(tmp_path):
    spec = _compile(tmp_path)

    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(_task_name(step) for step in STEP_NAMES)
    for before, step in zip(STEP_NAMES, STEP_NAMES[1:]):
        assert tasks[_task_name(step)]["dependentTasks"] == [_task_name(before)]
    assert "dependentTasks" not in tasks[_task_name(STEP_NAMES[0])]
    assert all(not task["cachingOptions"].get("enableCache") for task in tasks.values())  # the manifest decides


def test_every_step_runs_the_cli_in_the_configured_image(tmp_path):
    spec = _compile(tmp_path)

    executors = spec["deploymentSpec"]["executors"]
    for step in STEP_NAMES:
        container = executors[f"exec-{_task_name(step)}"]["container"]
        assert container["image"] == "registry.example/showtell:1.2"
        assert container["command"] == ["showtell"]
        assert container["args"] == [
            "run", "--config", "{{$.inputs.parameters['config']}}",
            "--until", step, "--date", "{{$.inputs.parameters['date']}}",
        ]  # fmt: skip
    tasks = spec["root"]["dag"]["tasks"]
    for step in STEP_NAMES:  # one day for the whole job: its creation time
        date = tasks[_task_name(step)]["inputs"]["parameters"]["date"]
        assert date["runtimeValue"]["constant"] == "{{$.pipeline_job_create_time_utc}}"


def test_the_config_parameter_defaults_to_config_url_or_the_given_path(tmp_path):
    given = _compile(tmp_path)
    assert given["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"] == str(tmp_path / "config.yaml")

    spec = _compile(tmp_path, "kfp.config_url=gs://bucket/configs/nightly.yaml")
    assert (
        spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"] == "gs://bucket/configs/nightly.yaml"
    )


def test_only_training_steps_get_the_accelerator_and_every_step_the_limits(tmp_path):
    spec = _compile(
        tmp_path,
        "kfp.train_accelerator=nvidia.com/gpu",
        "kfp.train_accelerator_count=2",
        "kfp.memory_limit=32G",
        "kfp.cpu_limit=8",
    )

    executors = spec["deploymentSpec"]["executors"]
    for step in STEP_NAMES:
        resources = executors[f"exec-{_task_name(step)}"]["container"]["resources"]
        assert (resources["resourceCpuLimit"], resources["resourceMemoryLimit"]) == ("8", "32G")
        if step.startswith("train-"):
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "2"
        else:
            assert "accelerator" not in resources
