import pytest

from tuneflow.config import load_params, load_pipelines, parse_set, pipeline_params
from tuneflow.errors import InputError


def test_defaults_without_params_file(tmp_path):
    params = load_params(tmp_path / "absent.yaml")
    assert params.data.source == "builtin:bbc"
    assert params.train.method == "lora"


def test_set_overrides_are_typed(tmp_path):
    params = load_params(tmp_path / "absent.yaml", ("--set", parse_set(["train.epochs=2", "data.sample=300", "data.dedup=false"])))
    assert params.train.epochs == 2 and params.data.sample == 300 and params.data.dedup is False


@pytest.mark.parametrize(
    "pair, expected",
    [
        ("train.epoch=2", "unknown key 'train.epoch'"),
        ("nosuch.key=1", "unknown key 'nosuch.key'"),
        ("train.epochs=many", "invalid value for 'train.epochs'"),
        ("data.sample=-5", "invalid value for 'data.sample'"),
        ("train.method=magic", "unknown method 'magic'"),
        ("train.epochs.deep=1", "unknown key 'train.epochs.deep'"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, pair, expected):
    with pytest.raises(InputError) as error:
        load_params(tmp_path / "absent.yaml", ("--set", parse_set([pair])))
    message = str(error.value)
    assert expected in message and message.startswith("--set") and "\n" not in message


def test_set_without_equals_is_rejected():
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        parse_set(["train.epochs"])


def test_bad_key_in_params_file_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(InputError, match=r"params.yaml: unknown key 'train.epochz'"):
        load_params(path)


def test_a_pipeline_is_an_explicit_overlay(tmp_path):
    pipelines = tmp_path / "pipelines.yaml"
    pipelines.write_text("pipelines:\n  a:\n    source: x.csv\n    method: full\n    set: {train.epochs: 1}\n")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("train:\n  method: dora\n  epochs: 3\n")
    name, params = pipeline_params("a", params_file, pipelines)
    assert name == "a" and (params.data.source, params.train.method, params.train.epochs) == ("x.csv", "full", 1)
    name, params = pipeline_params(None, params_file, pipelines)  # no --pipeline: params.yaml alone
    assert name == "params.yaml" and (params.data.source, params.train.method, params.train.epochs) == ("builtin:bbc", "dora", 3)
    pipelines.write_text("default: a\npipelines:\n  a: {}\n")  # the old implicit default is gone
    with pytest.raises(InputError, match="unknown key 'default'"):
        load_pipelines(pipelines)


def test_each_pipeline_has_its_own_artifacts_root_unless_it_sets_one(tmp_path):
    pipelines = tmp_path / "pipelines.yaml"
    pipelines.write_text("pipelines:\n  a: {}\n  b: {}\n  c:\n    set: {artifacts: shared}\n")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("artifacts: out\n")
    roots = {name: pipeline_params(name, params_file, pipelines)[1].artifacts for name in "abc"}
    assert roots == {"a": "out/pipelines/a", "b": "out/pipelines/b", "c": "shared"}
    assert pipeline_params(None, params_file, pipelines)[1].artifacts == "out"  # params.yaml alone: as dvc repro
    assert pipeline_params("a", params_file, pipelines, ("--set", {"artifacts": "mine"}))[1].artifacts == "mine"
