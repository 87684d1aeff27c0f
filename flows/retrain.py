"""The Prefect flow over the same six stage functions the CLI and DVC call."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneflow import progress
from tuneflow.artifacts import Layout, read_json
from tuneflow.config import Params, load_pipelines, pipeline_params
from tuneflow.errors import DataGateFailed
from tuneflow.stages import STAGES, summary_rows


def stage_markdown(stage_name: str, layout: Layout) -> str | None:
    """The UI artifact for a stage: validation summary, metrics table, promotion decision."""
    report = {"validate": layout.validation / "report.md", "evaluate": layout.eval / "report.md"}.get(stage_name)
    if report is not None:
        return report.read_text(encoding="utf-8") if report.exists() else None
    if stage_name == "promote":
        decision = read_json(layout.promotion / "decision.json")
        reasons = "\n".join(f"- {reason}" for reason in decision["reasons"])
        return (f"# Promotion: {'PROMOTED' if decision['promoted'] else 'NOT PROMOTED'}\n\n"
                f"`{decision['model_name']}` v{decision['version']} → @{decision['alias']} "
                f"(previous champion: {decision['previous_champion'] or 'none'})\n\n{reasons}\n")
    return None


def publish(stage_name: str, layout: Layout) -> None:
    markdown = stage_markdown(stage_name, layout)
    if markdown:
        create_markdown_artifact(markdown=markdown, key=f"{stage_name}-summary", description=f"tuneflow {stage_name}")


@task(cache_policy=NO_CACHE, retries=0)
def run_stage(stage_name: str, params: Params, layout: Layout, pipeline: str) -> None:
    try:
        with progress.stage(stage_name):
            STAGES[stage_name](params, layout, pipeline=pipeline)
    except DataGateFailed:
        publish(stage_name, layout)  # a failed gate still shows its evidence in the UI
        raise
    publish(stage_name, layout)


@flow(name="tuneflow-retrain", log_prints=True)
def retrain(params: Params, pipeline: str = "default") -> list[tuple[str, str]]:
    """ingest → validate → train → export → evaluate → promote; a failed stage stops the flow."""
    layout = Layout(Path(params.artifacts))
    for stage_name in STAGES:
        run_stage.with_options(name=stage_name)(stage_name, params, layout, pipeline)
    return summary_rows(layout)


@flow(name="tuneflow-scheduled", log_prints=True)
def scheduled_retrain(pipeline: str, params_file: str = "params.yaml", pipelines_file: str = "pipelines.yaml") -> list[tuple[str, str]]:
    """What a deployment runs: the files are read when the run starts, so a schedule uses the current params."""
    name, params = pipeline_params(pipeline, params_file, pipelines_file)
    return retrain(params=params, pipeline=name)


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

