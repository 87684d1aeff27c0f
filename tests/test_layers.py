"""The code's shape: layers (import-linter), no cycles, one stage table, one method table, one artifacts module."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO
from pipeline.runner import entry_function
from pipeline.table import STAGES

PACKAGES = ("tuneflow", "tasks", "pipeline", "flows", "cli")
PRODUCT_FILES = sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))


def test_import_linter_contracts_are_kept():
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout


def test_the_independence_contract_lists_exactly_the_tables_stage_modules():
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (independence,) = [contract for contract in contracts if contract["type"] == "independence"]
    assert sorted(independence["modules"]) == sorted(stage.module for stage in STAGES.values())


def test_no_import_cycles():
    import grimp

    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    cycles = [(importer, imported) for importer in graph.modules for imported in graph.find_modules_directly_imported_by(importer)
              if graph.chain_exists(imported, importer)]
    assert cycles == []


def test_each_entry_function_takes_exactly_what_its_stage_declares():
    for stage in STAGES.values():
        parameters = inspect.signature(entry_function(stage)).parameters
        required = {name for name, parameter in parameters.items() if parameter.default is inspect.Parameter.empty}
        declared = {*stage.params, *stage.inputs, *stage.context, "out_dir"}
        assert required <= declared <= set(parameters), stage.name


def test_the_cli_has_one_command_per_stage():
    from cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(STAGES) <= set(commands)
    assert "--fix" in commands["validate"].format_help()


def test_no_method_name_outside_the_method_table():
    from tuneflow.methods import METHODS

    quoted = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in METHODS))
    offenders = [f"{path.relative_to(REPO)}:{number}" for path in PRODUCT_FILES if path.name != "methods.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if quoted.search(line)]
    assert offenders == []


def test_artifact_file_names_live_in_the_artifacts_module():
    file_name = re.compile(r"[\"']([\w.-]+\.(?:json|md|onnx|parquet|png))[\"']")
    foreign = {"trainer_state.json"}  # the HF Trainer's own checkpoint file
    offenders = [f"{path.relative_to(REPO)}:{number}: {match}" for path in PRODUCT_FILES if path.name != "artifacts.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 for match in file_name.findall(line) if match not in foreign]
    assert offenders == []


def test_the_method_table_holds_its_options_and_the_validator_iterates_it():
    from tuneflow.config import Params, TrainConfig
    from tuneflow.methods import METHODS

    train_keys = set(TrainConfig.model_fields)
    for method in METHODS.values():
        assert set(method.options) <= train_keys, method.name
        TrainConfig(method=method.name)  # every table entry is a valid train.method
    unfreezable = {name for name, method in METHODS.items() if method.unfreezing}
    for name in METHODS:
        if name in unfreezable:
            TrainConfig(method=name, gradual_unfreezing=True)
        else:
            with pytest.raises(ValueError, match="gradual_unfreezing applies to methods"):
                TrainConfig(method=name, gradual_unfreezing=True)
    # every options section a method reads is in the shipped params.yaml, with its schema's keys
    import yaml

    shipped = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    for key in {key for method in METHODS.values() for key in method.options}:
        assert key in shipped, f"params.yaml lacks train.{key}"
        section = getattr(Params().train, key)
        if hasattr(section, "model_fields"):
            assert set(shipped[key]) == set(type(section).model_fields), f"params.yaml train.{key} keys differ from its schema"


def test_the_committed_dvc_yaml_is_the_generated_one():
    result = subprocess.run([sys.executable, "-m", "cli", "dvc-yaml", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_dvc_deps_are_derived_from_the_code():
    import yaml

    from cli.dvc_yaml import render
    from tuneflow.config import load_params

    stages = yaml.safe_load(render(load_params(REPO / "params.yaml")))["stages"]
    # the drift the hand-written file had: export without the method table, promote without the model or registry
    assert {"tuneflow/methods.py", "tuneflow/models.py", "tuneflow/onnx_runtime.py", "artifacts/model"} <= set(stages["export"]["deps"])
    assert "model" in stages["export"]["params"]
    assert {"artifacts/model", "tuneflow/registry.py"} <= set(stages["promote"]["deps"])
    assert "artifacts/source.json" in stages["ingest"]["deps"] and stages["source"]["always_changed"]
    assert "tuneflow/training.py" in stages["train"]["deps"] and "tuneflow/registry.py" not in stages["train"]["deps"]
