"""The Prefect driver: one task per stage of the table, cached on the same things DVC hashes.

A task's cache key is `pipeline.cache.stage_key`: its input artifacts, params sections, code and (ingest)
the data's content. A hit is trusted only while the stage's output folder still has the content the cached
run recorded; otherwise the stage runs again. Promote is never cached: it reads the live registry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from pipeline.cache import output_hash, stage_key
from pipeline.runner import RunFacts, run_stage
from pipeline.table import STAGES
from tuneflow import artifacts, progress
from tuneflow.artifacts import Layout, read_json
from tuneflow.config import Params, load_pipelines, pipeline_params
from tuneflow.errors import TuneflowError


class NoEmptyTraceback(logging.Filter):
    """Prefect logs a task that returned a Failed state with exc_info=True and no exception in flight, which prints
    "NoneType: None" under the line: a refusal stays one line (a real exception keeps its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


for _logger in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_logger).addFilter(NoEmptyTraceback())


def publish_report(stage_name: str, params: Params) -> None:
    """The stage's report.md as a markdown artifact on the flow run (the data gate's evidence even when it failed)."""
    report = Layout(Path(params.artifacts)).path(STAGES[stage_name].output) / artifacts.REPORT
    if report.exists():
        create_markdown_artifact(markdown=report.read_text(encoding="utf-8"), key=f"{stage_name}-report",
                                 description=f"tuneflow {stage_name}")


def cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    return stage_key(STAGES[parameters["stage_name"]], parameters["params"])


@task(retries=0)
def stage_task(stage_name: str, params: Params, facts: RunFacts) -> dict[str, Any]:
    """Run one stage; the result (what a later cache hit returns) is the hash of the folder it wrote."""
    stage = STAGES[stage_name]
    try:
        with progress.stage(stage_name):
            run_stage(stage, params, facts)
    except TuneflowError as error:
        publish_report(stage_name, params)  # a failed gate still shows its evidence in the UI
        return Failed(message=str(error), data=error)  # an expected refusal: its one line, no engine traceback
    publish_report(stage_name, params)
    return {"stage": stage_name, "output": stage.output, "output_hash": output_hash(stage, params)}


def run_cached(stage_name: str, params: Params, facts: RunFacts) -> None:
    stage = STAGES[stage_name]
    options: dict[str, Any] = {"name": stage_name}
    if stage.cache:
        options.update(cache_key_fn=cache_key, persist_result=True, result_serializer="json")
    else:
        options.update(cache_policy=NO_CACHE)
    state = stage_task.with_options(**options)(stage_name, params, facts, return_state=True)
    if state.is_completed() and state.name == "Cached" and state.result()["output_hash"] != output_hash(stage, params):
        progress.say(f"[tuneflow] {stage_name}: cached result, but {stage.output}/ changed since; running it again")
        state = stage_task.with_options(**options, refresh_cache=True)(stage_name, params, facts, return_state=True)
    elif state.name == "Cached":
        progress.say(f"[tuneflow] ✔ {stage_name} cached (inputs, params and code unchanged)")
    state.result()  # raises the stage's error, if any


@flow(name="tuneflow-retrain", log_prints=True)
def retrain(params: Params, run_name: str = "params.yaml") -> list[tuple[str, str]]:
    """ingest → validate → train → export → evaluate → promote; a failed stage stops the flow."""
    facts = RunFacts(run_name)
    try:
        for stage_name in STAGES:
            run_cached(stage_name, params, facts)
    except TuneflowError as error:
        return Failed(message=str(error), data=error)
    return summary_rows(Layout(Path(params.artifacts)))


@flow(name="tuneflow-scheduled", log_prints=True)
def scheduled_retrain(pipeline: str, params_file: str = "params.yaml", pipelines_file: str = "pipelines.yaml") -> list[tuple[str, str]]:
    """What a deployment runs: the files are read when the run starts, so a schedule uses the current params."""
    try:
        name, params = pipeline_params(pipeline, params_file, pipelines_file)
    except TuneflowError as error:
        return Failed(message=str(error), data=error)
    return retrain(params=params, run_name=name, return_state=True)


def build_deployments(pipelines_file: str, params_file: str, names: list[str] | None = None) -> list:
    """One deployment per pipeline with a cron schedule (or exactly the `names` asked for)."""
    pipelines = load_pipelines(pipelines_file).pipelines
    chosen = names or [name for name, pipeline in pipelines.items() if pipeline.schedule]
    for name in chosen:
        pipeline_params(name, params_file, pipelines_file)  # unknown name or bad override: exit 2 now, not at 3 a.m.
    return [
        scheduled_retrain.to_deployment(
            name=name,
            cron=pipelines[name].schedule,
            description=pipelines[name].description,
            parameters={"pipeline": name, "params_file": str(Path(params_file).resolve()),
                        "pipelines_file": str(Path(pipelines_file).resolve())},
            tags=["tuneflow"],
        )
        for name in chosen
    ]


def summary_rows(layout: Layout) -> list[tuple[str, str]]:
    """The final summary table, read back from the artifacts of the run."""
    card = read_json(layout.gated_data / artifacts.DATA_CARD)
    metrics = read_json(layout.path(artifacts.EVAL) / artifacts.METRICS)
    verdict = read_json(layout.path(artifacts.EVAL) / artifacts.VERDICT)
    decision = read_json(layout.path(artifacts.PROMOTION) / artifacts.DECISION)
    train_summary = read_json(layout.path(artifacts.MODEL) / artifacts.TRAIN_SUMMARY)
    counts, latency = card["counts"], metrics["latency_ms"]
    return [
        ("data", f"{card['source']}: train {counts['train']}, validation {counts['validation']}, test {counts['test']} "
                 f"({card['dropped']['duplicates']} duplicates, {card['dropped']['empty_text'] + card['dropped']['empty_label']} empty rows dropped, "
                 f"{card.get('gate_removed', 0)} removed by the data gate)"),
        ("method", f"{train_summary['method']} on {train_summary['base_model']}, {train_summary['trainable_params']:,} trainable params, "
                   f"{train_summary['train_time_s']:.0f}s training, best epoch {train_summary['best_epoch']:g}"),
        ("test macro-F1", f"{metrics['macro_f1']:.4f} (accuracy {metrics['accuracy']:.4f}) on the ONNX model"),
        ("evaluation gate", f"{'passed' if verdict['passed'] else 'FAILED'}: {verdict['summary']}"),
        ("latency", f"P50 {latency['p50']:.2f} ms, P95 {latency['p95']:.2f} ms, P99 {latency['p99']:.2f} ms (batch 1, {latency['samples']} requests)"),
        ("registry", f"{decision['model_name']} v{decision['version']} @{decision['alias']}"),
        ("promoted", f"{'yes' if decision['promoted'] else 'no'}: {'; '.join(decision['reasons'])}"),
    ]
