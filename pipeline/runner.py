"""Run one stage from the table: resolve its inputs and params, write its output folder whole, record its params.

The runner owns publication (Kedro's catalog owns IO the same way): the entry writes into a fresh staging
folder that replaces the stage's output folder only when the entry returns. It writes only into an artifacts
root that is tuneflow's (`artifacts.claim`: marked, or new, or adopted) and first recovers what a killed run
left there (`artifacts.holding`). A result may report a failure
(`result.failure(published_folder)`: the data gate, ONNX parity) that is raised after the output is published,
so its evidence stays readable.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.table import STAGES, WHOLE, Stage
from tuneflow import artifacts, progress
from tuneflow.artifacts import Layout, claim, claim_work, holding, publish, staging_dir, unclaim, write_json
from tuneflow.config import Params
from tuneflow.errors import InputError


@dataclass(frozen=True)
class RunFacts:
    """What a run knows beyond its params: its name (pipeline or params file), the DVC experiment, if any, and under
    `dvc repro` the hashes dvc.lock holds for the outputs of the stages that ran before this one."""

    run_name: str = "params.yaml"
    experiment: str | None = None
    dvc_lock: dict[str, dict[str, str]] | None = None

    @classmethod
    def from_environment(cls, run_name: str) -> "RunFacts":
        # `dvc exp run` sets these for the stage commands it runs (DVCLive reads them the same way)
        experiment = os.environ.get("DVC_EXP_NAME") or (os.environ.get("DVC_EXP_BASELINE_REV") and "unnamed")
        return cls(run_name, experiment or None, dvc_lock_outs())


def dvc_lock_outs() -> dict[str, dict[str, str]] | None:
    """{stage: {out path: md5}} from dvc.lock when DVC runs this stage (it sets DVC_STAGE and DVC_ROOT, and rewrites
    dvc.lock after each stage, so the stages before this one hold this run's hashes); None outside DVC."""
    import yaml

    lock = Path(os.environ.get("DVC_ROOT", ".")) / "dvc.lock"
    if not os.environ.get("DVC_STAGE") or not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {name: {out["path"]: out.get("md5", "") for out in entry.get("outs", [])}
            for name, entry in stages.items() if name != os.environ["DVC_STAGE"] and entry.get("outs")}


def entry_function(stage: Stage) -> Callable[..., Any]:
    module, _, function = stage.entry.partition(":")
    return getattr(importlib.import_module(module), function)


def params_of(stage: Stage, params: Params) -> dict[str, Any]:
    """The entry's params keywords: each the section the table names (or the whole Params)."""
    return {keyword: params if section == WHOLE else getattr(params, section) for keyword, section in stage.params.items()}


def sections_of(stage: Stage) -> list[str]:
    """The params.yaml sections a stage reads (what DVC tracks as its params)."""
    if WHOLE in stage.params.values():
        return list(Params.model_fields)
    return sorted(set(stage.params.values()))


def params_read(stage: Stage, params: Params) -> dict[str, Any]:
    """The resolved values of the sections a stage reads: what params.json records and the cache key hashes."""
    dumped = params.model_dump(mode="json")
    return {section: dumped[section] for section in sections_of(stage)}


def producer(relative: str) -> str:
    top = relative.split("/")[0]
    return next((stage.name for stage in STAGES.values() if stage.output == top), "ingest")


def run_stage(stage: Stage, params: Params, facts: RunFacts = RunFacts()) -> Any:
    layout = Layout(Path(params.artifacts))
    inputs = {keyword: layout.path(relative) for keyword, relative in stage.inputs.items()}
    for keyword, path in inputs.items():
        if not path.exists():
            raise InputError(f"{path}: missing; run `tuneflow {producer(stage.inputs[keyword])}` first")
    uses_work = "work_dir" in stage.context
    made: list[Path] = []  # folders this call created: removed again if the stage leaves nothing in them
    try:
        if claim(layout.root):
            made.append(layout.root)
        if uses_work:
            scratch_parent_existed = layout.work.parent.exists()
            if claim_work(layout.work):
                made += [layout.work] + ([] if scratch_parent_existed else [layout.work.parent])
        with holding(layout.root) as recovered:
            for line in recovered:
                progress.say(f"[tuneflow] {layout.root}: {line}")
            result = run_and_publish(stage, params, facts, layout, inputs)
    except BaseException:
        for folder in made:  # bad input leaves nothing behind, not even the empty artifacts root
            unclaim(folder)
        raise
    failure = result.failure(layout.path(stage.output)) if hasattr(result, "failure") else None
    if failure is not None:
        raise failure
    return result


def run_and_publish(stage: Stage, params: Params, facts: RunFacts, layout: Layout, inputs: dict[str, Path]) -> Any:
    """The entry writes into a staging folder; params.json goes in last, then the folder replaces the stage's output."""
    available = {"work_dir": layout.work, "run_name": facts.run_name, "experiment": facts.experiment, "dvc_lock": facts.dvc_lock}
    context = {name: available[name] for name in stage.context}
    target = layout.path(stage.output)
    staging = staging_dir(target)
    try:
        result = entry_function(stage)(**params_of(stage, params), **inputs, **context, out_dir=staging)
        write_json(staging / artifacts.PARAMS, {"run": facts.run_name, "stage": stage.name, **params_read(stage, params)})
        if getattr(result, "publish", True):
            publish(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result
