"""The Prefect driver: one task per stage of the table, cached on the same things DVC hashes.

A task's cache key is `pipeline.cache.stage_key`: its input artifacts, params sections, code and (ingest)
the data's content. A hit is trusted only while the stage's output folder still has the content the cached
run recorded; otherwise the stage runs again. Promote is never cached: it reads the live registry.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, tags, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.automations import Automation
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.runtime import flow_run, task_run
from prefect.schedules import Cron
from prefect.states import Failed
from prefect.tasks import exponential_backoff
from prefect.variables import Variable

from pipeline.cache import output_hash, stage_key
from pipeline.runner import RunFacts, run_stage
from pipeline.table import STAGES
from tuneflow import artifacts, progress
from tuneflow.artifacts import Layout, read_json
from tuneflow.config import Params, load_pipelines, pipeline_params
from tuneflow.data import source_fingerprint
from tuneflow.errors import InputError, StageFailed, TuneflowError
from tuneflow.registry import run_link


class NoEmptyTraceback(logging.Filter):
    """Prefect logs a task that returned a Failed state with exc_info=True and no exception in flight, which prints
    "NoneType: None" under the line: a refusal stays one line (a real exception keeps its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


for _logger in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_logger).addFilter(NoEmptyTraceback())


def transient(error: BaseException | None) -> bool:
    """Worth another attempt: a registry error (unreachable, locked) or file I/O that failed on the way; not a missing
    or refused path, and never a stage that ran past its timeout."""
    if isinstance(error, TuneflowError):
        return error.transient
    return isinstance(error, OSError) and not isinstance(
        error, (TimeoutError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError))


def retry_if_transient(task: Any, run: Any, state: Any) -> bool:
    return transient(state.result(raise_on_failure=False))


def publish_artifacts(stage_name: str, params: Params) -> None:
    """What the Prefect UI shows of a stage: its report.md (the data gate's evidence even when it failed) and tables."""
    layout = Layout(Path(params.artifacts))
    out = layout.path(STAGES[stage_name].output)
    if (out / artifacts.REPORT).exists():
        create_markdown_artifact(markdown=(out / artifacts.REPORT).read_text(encoding="utf-8"), key=f"{stage_name}-report",
                                 description=f"tuneflow {stage_name}")
    if stage_name == "validate" and (out / artifacts.GATE_REPORT).exists():
        checks = read_json(out / artifacts.GATE_REPORT)["checks"]
        create_table_artifact(key="data-gate", description="tuneflow validate: every check of the data gate",
                              table=[check_row(check) for check in checks])
    if stage_name == "evaluate" and (out / artifacts.VERDICT).exists():
        create_table_artifact(key="evaluation-gate", description="tuneflow evaluate: every check of the evaluation gate",
                              table=[check_row(check) for check in read_json(out / artifacts.VERDICT)["checks"]])
        latency = read_json(out / artifacts.METRICS)["latency_ms"]
        create_table_artifact(key="latency", description="tuneflow evaluate: the shipped ONNX model, batch 1 (ms)",
                              table=[{key: latency[key] for key in ("p50", "p95", "p99", "samples") if key in latency}])
    if stage_name == "promote" and (out / artifacts.DECISION).exists():
        decision = read_json(out / artifacts.DECISION)
        create_markdown_artifact(key="promotion", description="tuneflow promote: the decision", markdown=(
            f"**{decision['model_name']} v{decision['version']} → @{decision['alias']}** "
            f"({'promoted' if decision['promoted'] else 'not promoted'}; previous champion: "
            f"{decision['previous_champion'] or 'none'})\n\n" + "\n".join(f"- {reason}" for reason in decision["reasons"])
            + f"\n\nMLflow: {run_link(decision.get('tracking_uri') or '', decision.get('run_id'))}\n"))


def check_row(check: dict[str, Any]) -> dict[str, Any]:
    return {key: check.get(key) if isinstance(check.get(key), (str, int, float, bool, type(None))) else str(check.get(key))
            for key in ("name", "passed", "severity", "gating", "value", "threshold", "reason") if key in check}


def cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    return stage_key(STAGES[parameters["stage_name"]], parameters["params"])


@task
def stage_task(stage_name: str, params: Params, facts: RunFacts) -> dict[str, Any]:
    """Run one stage; the result (what a later cache hit returns) is the hash of the folder it wrote."""
    stage = STAGES[stage_name]
    try:
        with progress.stage(stage_name):
            run_stage(stage, params, facts)
    except Exception as error:
        if transient(error) and task_run.run_count <= params.orchestration.retries:
            raise  # Prefect logs one line and runs the stage again after the backoff (train resumes from its checkpoint)
        if not isinstance(error, TuneflowError):
            raise  # unexpected: Prefect keeps the traceback
        publish_artifacts(stage_name, params)
        return Failed(message=str(error), data=error)  # an expected refusal: its one line, no engine traceback
    publish_artifacts(stage_name, params)
    return {"stage": stage_name, "output": stage.output, "output_hash": output_hash(stage, params)}


def run_cached(stage_name: str, params: Params, facts: RunFacts) -> None:
    stage, orchestration = STAGES[stage_name], params.orchestration
    options: dict[str, Any] = {"name": stage_name, "retries": orchestration.retries, "retry_condition_fn": retry_if_transient,
                               "retry_delay_seconds": exponential_backoff(backoff_factor=orchestration.retry_delay_s),
                               "timeout_seconds": orchestration.timeout_s.get(stage_name)}
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
    if state.name == "TimedOut":  # its output folder is the previous one: stages publish by rename
        raise StageFailed(f"{stage_name} stopped after orchestration.timeout_s.{stage_name} = "
                          f"{orchestration.timeout_s[stage_name]:g} s")
    state.result()  # raises the stage's error, if any


def check_orchestration(params: Params) -> None:
    unknown = sorted(set(params.orchestration.timeout_s) - set(STAGES))
    if unknown:
        raise InputError(f"orchestration.timeout_s: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")


def name_flow_run(run_name: str, params: Params) -> None:
    """Once ingest has hashed the data: "<pipeline> · data <hash> · <method>", the run's name in the UI (and the name
    of the deployment's run this one is a subflow of)."""
    from prefect.client.orchestration import get_client

    card = read_json(Layout(Path(params.artifacts)).path(artifacts.DATA) / artifacts.DATA_CARD)
    name = f"{run_name} · data {card['data_hash'][:12]} · {params.train.method}"
    with get_client(sync_client=True) as client:
        for run_id in filter(None, (flow_run.id, flow_run.parent_flow_run_id)):
            client.update_flow_run(run_id, name=name)


@flow(name="tuneflow-retrain", log_prints=True)
def retrain(params: Params, run_name: str = "params.yaml") -> list[tuple[str, str]]:
    """ingest → validate → train → export → evaluate → promote; a failed stage stops the flow."""
    facts = RunFacts(run_name)
    layout = Layout(Path(params.artifacts))
    waiting = lambda: progress.say(f"[tuneflow] {params.artifacts}: another run is using it; waiting for it to end")
    try:
        check_orchestration(params)
        with layout.one_run(waiting):
            for stage_name in STAGES:
                run_cached(stage_name, params, facts)
                if stage_name == "ingest":
                    name_flow_run(run_name, params)
    except TuneflowError as error:
        return Failed(message=str(error), data=error)
    return summary_rows(layout)


@flow(name="tuneflow-scheduled", log_prints=True)
def scheduled_retrain(pipeline: str, params_file: str = "params.yaml", pipelines_file: str = "pipelines.yaml",
                      overrides: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """What a deployment runs: the files are read when the run starts, so a schedule uses the current params.
    `overrides` ({"train.epochs": 1}, as --set) applies on top, e.g. `prefect deployment run ... --param overrides=...`."""
    try:
        name, params = pipeline_params(pipeline, params_file, pipelines_file, ("deployment parameter overrides", overrides or {}))
    except TuneflowError as error:
        return Failed(message=str(error), data=error)
    with tags(*flow_run.tags):  # the pipeline's subflow carries the deployment's tag too: the zombie automation matches it
        return retrain(params=params, run_name=name, return_state=True)


@flow(name="tuneflow-on-data-change", log_prints=True)
def retrain_on_data_change(pipeline: str, params_file: str = "params.yaml", pipelines_file: str = "pipelines.yaml") -> str:
    """What a `watch` deployment runs: hash data.source (as the ingest cache does) and retrain only when the content
    differs from the last one a completed retrain of this pipeline read (a Prefect variable, shown in the UI)."""
    try:
        name, params = pipeline_params(pipeline, params_file, pipelines_file)
    except TuneflowError as error:
        return Failed(message=str(error), data=error)
    fingerprint = source_fingerprint(params.data)
    variable = "tuneflow-source-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)
    last = Variable.get(variable)
    if fingerprint is not None and fingerprint == last:
        progress.say(f"[tuneflow] {name}: {params.data.source} unchanged (sha256 {fingerprint[:12]}); nothing to retrain")
        return "unchanged"
    progress.say(f"[tuneflow] {name}: {params.data.source} changed (sha256 {str(fingerprint)[:12]}, was {str(last)[:12]}); retraining")
    with tags(*flow_run.tags):
        state = retrain(params=params, run_name=name, return_state=True)
    if not state.is_completed():
        return state
    if fingerprint is not None:
        Variable.set(variable, fingerprint, overwrite=True)
    return "retrained"


DEPLOYED_TAG = "tuneflow"  # every run of a `tuneflow deploy` deployment, and its pipeline subflow, carries it
ZOMBIE_AUTOMATION = "tuneflow: crash deployed runs that stopped sending heartbeats"
MISSED_HEARTBEATS = 3


def same_trigger(left: EventTrigger, right: EventTrigger) -> bool:
    return left.model_dump(exclude={"id"}) == right.model_dump(exclude={"id"})


def crash_runs_without_heartbeats(heartbeat_s: int) -> Automation:
    """Prefect's zombie detection (docs.prefect.io/v3/advanced/detect-zombie-flows), created or updated on the server:
    a deployed run whose process died (a killed `tuneflow deploy`, a lost machine) stops sending heartbeats and is marked
    Crashed after MISSED_HEARTBEATS beats; so is one left Pending that long (its runner died before starting it).
    Leaving Running frees the deployment's concurrency slot for the next run at once; without it the dead run shows
    Running forever and its slot's lease holds the next run for up to 5 minutes.
    `tuneflow run` runs (no deployment tag) are left alone: their heartbeats may be slower than the window."""
    automation = Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"A tuneflow deployed flow run with no heartbeat for {MISSED_HEARTBEATS} x {heartbeat_s} s is marked Crashed.",
        trigger=EventTrigger(
            # the server's own Pending and Running events start the window too: a run whose runner died before it
            # started (stranded in Pending, holding the slot) or before its first heartbeat reached the server is caught
            after={"prefect.flow-run.Pending", "prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.Running", "prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{DEPLOYED_TAG}"}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=MISSED_HEARTBEATS * heartbeat_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {MISSED_HEARTBEATS * heartbeat_s} s: its process died")])
    try:
        existing = Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:  # not on this server yet
        return automation.create()
    if same_trigger(existing.trigger, automation.trigger):
        return existing  # left as it is: updating an automation drops the windows it has open (a killed run's among them)
    automation.id = existing.id
    automation.update()
    return automation


def build_deployments(pipelines_file: str, params_file: str, names: list[str] | None = None) -> list:
    """Per pipeline: its cron schedule's deployment, and a `<name>-on-data-change` one when it has a `watch` cron (or
    exactly the `names` asked for, scheduled or not)."""
    pipelines = load_pipelines(pipelines_file).pipelines
    chosen = names or [name for name, pipeline in pipelines.items() if pipeline.schedule or pipeline.watch]
    for name in chosen:
        pipeline_params(name, params_file, pipelines_file)  # unknown name or bad override: exit 2 now, not at 3 a.m.
    files = {"params_file": str(Path(params_file).resolve()), "pipelines_file": str(Path(pipelines_file).resolve())}
    # one run of a pipeline at a time: a run due while one is going waits for it (never two promotions racing)
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    deployments = []
    for name in chosen:
        pipeline = pipelines[name]
        if pipeline.schedule or not pipeline.watch:
            deployments.append(scheduled_retrain.to_deployment(
                name=name, schedules=[Cron(pipeline.schedule, timezone=pipeline.timezone)] if pipeline.schedule else [],
                concurrency_limit=one_at_a_time, description=pipeline.description,
                parameters={"pipeline": name, **files}, tags=[DEPLOYED_TAG]))
        if pipeline.watch:
            deployments.append(retrain_on_data_change.to_deployment(
                name=f"{name}-on-data-change", schedules=[Cron(pipeline.watch, timezone=pipeline.timezone)],
                concurrency_limit=one_at_a_time, description=f"{pipeline.description} Retrains when data.source changes.",
                parameters={"pipeline": name, **files}, tags=[DEPLOYED_TAG]))
    return deployments


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
