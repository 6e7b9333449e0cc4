"""schemas/config.py: YAML loading, `--set` overrides, and errors that name the dotted key; and
`{date}` filled in (schemas/dates.py)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from schemas.config import ConfigError, build_config, join_url, load_config, load_dated_config, parse_override
from schemas.dates import run_day
from schemas.errors import ShowtellError

REPO = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_config_reads_nested_yaml_and_fills_defaults(tmp_path):
    path = _write(tmp_path, "run_root: /runs/x\ndata:\n  shards: {train: 16}\n  min_word_count: 2\n")

    config = load_config(path)

    assert config.run_root == "/runs/x"
    assert (config.data.shards.train, config.data.shards.val, config.data.shards.test) == (16, 4, 8)
    assert config.data.min_word_count == 2
    assert config.beam.runner == "DirectRunner"
    assert config.data_dir == "/runs/x/data"


def test_load_config_applies_overrides_over_the_file(tmp_path):
    path = _write(tmp_path, "run_root: /runs/x\ndata:\n  shards: {train: 16}\n")

    config = load_config(path, ["data.shards.train=3", "run_root=/elsewhere"])

    assert config.data.shards.train == 3
    assert config.run_root == "/elsewhere"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data.shards.train=16", ("data.shards.train", 16)),
        ("a.flag=true", ("a.flag", True)),
        ("a.flag=false", ("a.flag", False)),
        ("data.backoff=2.5", ("data.backoff", 2.5)),
        ("beam.options=[--a=1, --b]", ("beam.options", ["--a=1", "--b"])),
        ("data.source=http://images.cocodataset.org", ("data.source", "http://images.cocodataset.org")),
        ("run_root=gs://bucket/x=y", ("run_root", "gs://bucket/x=y")),  # only the first `=` splits
        (" data.mirror = null", ("data.mirror", None)),
        ("data.source=", ("data.source", "")),
        ("data.source=[unclosed", ("data.source", "[unclosed")),  # not YAML: kept as the raw text
    ],
)
def test_parse_override_reads_the_value_as_yaml(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["no_equals_sign", "=3", "  =3"])
def test_parse_override_rejects_text_without_a_key(text):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override(text)


def test_build_config_overrides_reach_every_kind_of_field():
    config = build_config(
        {"run_root": "r"},
        [
            "data.shards.val=2",
            "data.sample.seed=7",
            "data.download.backoff_seconds=0.5",
            "beam.runner=DataflowRunner",
            "beam.direct_running_mode=in_memory",
            "beam.options=[--project=p, --region=us-central1, --flag]",
        ],
    )

    assert config.data.shards.val == 2
    assert config.data.sample.seed == 7
    assert config.data.download.backoff_seconds == 0.5
    assert config.beam.runner == "DataflowRunner"
    assert config.beam.direct_running_mode == "in_memory"
    assert config.beam.options == ["--project=p", "--region=us-central1", "--flag"]


def test_build_config_does_not_mutate_the_callers_tree():
    tree = {"run_root": "r", "data": {"shards": {"train": 5}}}

    build_config(tree, ["data.shards.train=9", "data.min_word_count=1"])

    assert tree == {"run_root": "r", "data": {"shards": {"train": 5}}}


@pytest.mark.parametrize(
    "tree, overrides, key, why",
    [
        ({"run_root": "r", "data": {"shardz": 1}}, [], "data.shardz", "unknown key"),
        ({"run_root": "r"}, ["data.shardz=1"], "data.shardz", "unknown key"),
        ({"run_root": "r"}, ["data.shards.train=0"], "data.shards.train", "greater than 0"),
        ({"run_root": "r"}, ["data.shards.train=abc"], "data.shards.train", "valid integer"),
        ({"run_root": "r"}, ["data.shards.train=2.5"], "data.shards.train", "integer"),
        ({"run_root": "r"}, ["beam.direct_running_mode=fast"], "beam.direct_running_mode", "multi_processing"),
        ({"run_root": "r"}, ["beam.options=--single"], "beam.options", "valid list"),
        ({"run_root": "r"}, ["data.min_word_count=0"], "data.min_word_count", "greater than or equal to 1"),
        ({"run_root": "r"}, ["data.shards=8"], "data.shards", "Shards"),
        ({}, [], "run_root", "required key is missing"),
    ],
)
def test_build_config_errors_name_the_dotted_key_and_why(tree, overrides, key, why):
    with pytest.raises(ConfigError) as raised:
        build_config(tree, overrides, origin="my.yaml")

    message = str(raised.value)
    assert message.startswith("my.yaml: ")
    assert f"{key}: " in message
    assert why in message


def test_config_error_is_a_showtell_error():
    with pytest.raises(ShowtellError):
        build_config({})


def test_override_under_a_value_says_the_key_is_not_a_section():
    with pytest.raises(ConfigError, match=r"--set run_root\.deeper: run_root is a value, not a section"):
        build_config({"run_root": "r"}, ["run_root.deeper=1"])


def test_override_two_levels_under_a_value_names_the_value_key():
    with pytest.raises(ConfigError, match=r"data\.source is a value, not a section"):
        build_config({"run_root": "r", "data": {"source": "sample"}}, ["data.source.x.y=1"])


def test_every_error_is_reported_not_just_the_first():
    with pytest.raises(ConfigError) as raised:
        build_config({"run_root": "r"}, ["data.shards.train=0", "data.shards.test=-1"])

    assert "data.shards.train" in str(raised.value)
    assert "data.shards.test" in str(raised.value)


@pytest.mark.parametrize("value", ["true", "yes"])
def test_a_bool_for_an_integer_key_is_a_type_error(value):
    with pytest.raises(ConfigError, match="data.shards.train"):
        build_config({"run_root": "r"}, [f"data.shards.train={value}"])


@pytest.mark.parametrize(
    "run_root, mirror",
    [
        ("/tmp/run", "/tmp/run/raw"),
        ("/tmp/run/", "/tmp/run/raw"),
        ("gs://bucket/showtell", "gs://bucket/showtell/raw"),
        ("gs://bucket/", "gs://bucket/raw"),
    ],
)
def test_mirror_defaults_to_raw_under_run_root(run_root, mirror):
    assert build_config({"run_root": run_root}).data.mirror == mirror


def test_explicit_mirror_is_kept():
    config = build_config({"run_root": "/run", "data": {"mirror": "s3://m/coco"}})

    assert config.data.mirror == "s3://m/coco"


def test_mirror_default_follows_a_run_root_override():
    config = build_config({"run_root": "/a"}, ["run_root=gs://b/c"])

    assert config.data.mirror == "gs://b/c/raw"
    assert config.data_dir == "gs://b/c/data"


@pytest.mark.parametrize(
    "base, parts, expected",
    [
        ("/tmp/run", ("data",), "/tmp/run/data"),
        ("/tmp/run/", ("/data/", "x.txt"), "/tmp/run/data/x.txt"),
        ("runs/local", ("raw", "zips/train2014.zip"), "runs/local/raw/zips/train2014.zip"),
        ("gs://bucket", ("data", "train-00000-of-00256"), "gs://bucket/data/train-00000-of-00256"),
        ("gs://bucket/root/", ("/raw",), "gs://bucket/root/raw"),
        ("http://images.cocodataset.org", ("zips/val2014.zip",), "http://images.cocodataset.org/zips/val2014.zip"),
        ("gs://bucket/x", (), "gs://bucket/x"),
    ],
)
def test_join_url_joins_with_single_slashes(base, parts, expected):
    assert join_url(base, *parts) == expected


@pytest.mark.parametrize(
    "text, fault",
    [
        ("- a\n- b\n", "expected a mapping of keys at the top level"),
        ("just a string\n", "expected a mapping of keys at the top level"),
        ("run_root: [unclosed\n", "not valid YAML"),
    ],
)
def test_load_config_rejects_files_that_are_not_a_yaml_mapping(tmp_path, text, fault):
    path = _write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    assert str(path) in str(raised.value)
    assert fault in str(raised.value)


def test_load_config_on_an_empty_file_asks_for_run_root(tmp_path):
    path = _write(tmp_path, "")

    with pytest.raises(ConfigError, match=r"run_root: required key is missing"):
        load_config(path)


def test_load_config_errors_are_prefixed_with_the_file(tmp_path):
    path = _write(tmp_path, "run_root: r\ndata:\n  shardz: 3\n")

    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: data\.shardz: unknown key$"):
        load_config(path)


def test_load_config_on_a_missing_file_names_it(tmp_path):
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: config file not found"):
        load_config(path)


def test_load_config_on_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_config(tmp_path)


def test_shipped_local_config_is_the_small_sample_run():
    config = load_config(REPO / "configs" / "local.yaml")

    assert config.data.source == "sample"
    assert config.run_root == "runs/local"
    assert config.data.mirror == "runs/local/raw"
    assert (config.data.shards.train, config.data.shards.val, config.data.shards.test) == (8, 2, 2)
    assert config.data.min_word_count == 4
    assert config.beam.runner == "DirectRunner"
    assert config.beam.direct_running_mode == "multi_processing"
    assert config.beam.direct_num_workers == 0


def test_shipped_mscoco_config_matches_im2txt():
    config = load_config(REPO / "configs" / "mscoco.yaml")

    assert config.data.source == "http://images.cocodataset.org"
    assert (config.data.shards.train, config.data.shards.val, config.data.shards.test) == (256, 4, 8)
    assert config.data.min_word_count == 4
    assert config.data.shuffle_seed == 12345
    assert config.data.mirror == "runs/mscoco/raw"


def test_shipped_mscoco_config_accepts_the_dataflow_overrides_its_comment_shows():
    config = load_config(
        REPO / "configs" / "mscoco.yaml",
        [
            "run_root=gs://my-bucket/showtell",
            "beam.runner=DataflowRunner",
            "beam.options=[--project=p, --region=us-central1, --temp_location=gs://my-bucket/tmp]",
        ],
    )

    assert config.data.mirror == "gs://my-bucket/showtell/raw"
    assert config.beam.options == ["--project=p", "--region=us-central1", "--temp_location=gs://my-bucket/tmp"]


def test_train_phase_picks_a_phase_by_number():
    config = build_config({"run_root": "r", "train": {"phase1": {"steps": 7}, "phase2": {"steps": 9}}})

    assert (config.train.phase(1).steps, config.train.phase(2).steps) == (7, 9)


def test_eval_defaults_are_im2txt_inference_and_select_by_cider():
    config = build_config({"run_root": "r"})

    assert (config.eval.beam_size, config.eval.max_caption_length, config.eval.length_normalization) == (3, 20, 0.0)
    assert config.eval.select_by == "CIDEr" and config.eval.split == "test"
    assert config.eval_dir == "r/eval"
    with pytest.raises(ConfigError, match="eval.select_by"):
        build_config({"run_root": "r", "eval": {"select_by": "accuracy"}})


def test_promote_and_run_defaults_and_their_checks():
    config = build_config({"run_root": "r"})

    assert (config.promote.models_root, config.promote.metric, config.promote.tolerance) == (None, "CIDEr", 0.0)
    assert config.run.lock_stale_seconds == 600
    with pytest.raises(ConfigError, match="promote.metric"):
        build_config({"run_root": "r", "promote": {"metric": "accuracy"}})
    with pytest.raises(ConfigError, match="promote.tolerance"):
        build_config({"run_root": "r"}, ["promote.tolerance=-0.1"])
    with pytest.raises(ConfigError, match="run.lock_stale_seconds"):
        build_config({"run_root": "r"}, ["run.lock_stale_seconds=0"])


def test_data_checks_default_to_thresholds_that_stop_poisoned_data_and_null_turns_one_off():
    checks = build_config({"run_root": "r"}).checks

    assert (checks.max_skip_rate_increase, checks.max_caption_length_drift, checks.max_oov_rate_increase) == (
        0.05,
        0.2,
        0.05,
    )
    assert (checks.min_records_ratio, checks.min_captions_compared) == (0.5, 100)
    off = build_config({"run_root": "r", "checks": {"max_skip_rate_increase": None}}, ["checks.min_records_ratio=null"])
    assert off.checks.max_skip_rate_increase is None and off.checks.min_records_ratio is None
    assert build_config({"run_root": "r"}, ["checks.max_caption_length_drift=0"]).checks.max_caption_length_drift == 0


@pytest.mark.parametrize(
    "override, why",
    [
        ("checks.max_skip_rate_increase=-0.1", "greater than or equal to 0"),
        ("checks.max_oov_rate_increase=1.5", "less than or equal to 1"),
        ("checks.min_records_ratio=.inf", "finite number"),
        ("checks.min_captions_compared=0", "greater than or equal to 1"),
        ("checks.max_drift=0.1", "unknown key"),
    ],
)
def test_a_bad_data_check_threshold_is_an_error_naming_its_key(override, why):
    with pytest.raises(ConfigError) as raised:
        build_config({"run_root": "r"}, [override])

    assert f"{override.split('=')[0]}: " in str(raised.value) and why in str(raised.value)


def test_shipped_nightly_config_fills_in_the_date_and_shares_mirror_and_models():
    config = load_dated_config(str(REPO / "configs" / "nightly.yaml"), date="2025-01-31")

    assert config.run_root == "gs://YOUR-BUCKET/showtell/runs/2025-01-31"
    assert config.data_dir == "gs://YOUR-BUCKET/showtell/runs/2025-01-31/data"
    assert config.data.source.startswith("gs://") and config.data.mirror == "gs://YOUR-BUCKET/showtell/mirror"
    assert config.promote.models_root == "gs://YOUR-BUCKET/showtell/models"
    mscoco = load_config(REPO / "configs" / "mscoco.yaml")
    # The first night trains as configs/mscoco.yaml; later ones fine-tune the promoted model within a budget.
    assert config.model == mscoco.model and config.train.phase1 == mscoco.train.phase1
    phase2, mscoco_phase2 = (c.train.phase2.model_dump(exclude={"checkpoint_every"}) for c in (config, mscoco))
    assert phase2 == mscoco_phase2
    assert (config.train.init_from, config.train.warm_start_steps, config.train.max_minutes) == ("promoted", 20000, 480)
    today = load_dated_config(str(REPO / "configs" / "nightly.yaml")).run_root
    assert re.fullmatch(r"gs://YOUR-BUCKET/showtell/runs/\d{4}-\d{2}-\d{2}", today)


def test_date_fills_every_string_value_and_overrides_too(tmp_path):
    path = _write(tmp_path, "run_root: /runs/{date}\nbeam:\n  options: ['--temp_location=/tmp/{date}']\n")

    config = load_dated_config(str(path), ["promote.models_root=/models/{date}"], date="2025-02-01")

    assert config.run_root == "/runs/2025-02-01" and config.data.mirror == "/runs/2025-02-01/raw"
    assert config.beam.options == ["--temp_location=/tmp/2025-02-01"]
    assert config.promote.models_root == "/models/2025-02-01"


@pytest.mark.parametrize(
    "given, day",
    [("2025-01-31", "2025-01-31"), ("2025-01-31T02:00:07Z", "2025-01-31"), ("2025-01-31T23:30:00-02:00", "2025-02-01")],
)
def test_the_run_day_of_a_date_or_a_kubeflow_job_time_is_its_utc_day(given, day):
    assert run_day(given) == day
