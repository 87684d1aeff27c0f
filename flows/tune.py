"""`tuneflow tune`: an Optuna study over `tune.space.<method>`, selected on the validation split only.

Ingest and the data gate run once through the stage runner; every trial then trains on the gated data with the
train stage's own entry function, in this process, with a callback that reports each epoch's validation metric to
the trial (the pruner may stop it there). Train reads the train and validation splits only: nothing in a study
reads the test split. The study runs in one Prefect task: TPE proposes each trial from the ones before it, so the
trials are sequential anyway, and the Optuna storage (SQLite under <artifacts>/tune/ by default) already records
every trial durably, which is what lets a killed study resume. Prefect gets a table artifact after each trial;
MLflow gets a study run with one child run per trial. The best trial's values become a named pipeline in
pipelines.tuned.yaml (pipelines.yaml includes it): `tuneflow run --pipeline tuned-<method>` trains them and gates
the result on the test split, once.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.compare import linked_layout
from pipeline.runner import entry_function, params_of, run_stage
from pipeline.table import STAGES
from tuneflow import artifacts, progress, tuning
from tuneflow.artifacts import Layout, read_json, write_json
from tuneflow.config import Params, with_overrides
from tuneflow.errors import StageFailed

FINISHED = ("COMPLETE", "PRUNED")
KEPT_FILES = (artifacts.TRAIN_SUMMARY, artifacts.REPORT, artifacts.LOSS_CURVES)  # of a trial that is not the best


@dataclass(frozen=True)
class Study:
    """What the flow needs from one study: where it lives and what it found."""

    name: str
    storage: str
    root: Path
    overrides: dict[str, Any]  # the space's keys and the best trial's values
    summary: dict[str, Any]


def storage_url(params: Params) -> str:
    return params.tune.storage or f"sqlite:///{(Path(params.artifacts) / artifacts.TUNE / artifacts.STUDY_DB).resolve()}"


def train_trial(trial_params: Params, layout: Layout, callbacks: list[Any]) -> dict[str, Any]:
    """The train stage's entry on a trial's artifacts root, its inputs and params as the stage table declares them."""
    stage = STAGES["train"]
    inputs = {keyword: layout.path(relative) for keyword, relative in stage.inputs.items()}
    layout.work.mkdir(parents=True, exist_ok=True)
    try:
        result = entry_function(stage)(**params_of(stage, trial_params), **inputs, work_dir=layout.work,
                                       out_dir=layout.path(stage.output), callbacks=callbacks)
    finally:
        shutil.rmtree(layout.work, ignore_errors=True)  # a pruned trial's checkpoints (a killed one keeps them)
    return result.summary


def trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for trial in study.trials:
        seconds = ((trial.datetime_complete - trial.datetime_start).total_seconds()
                   if trial.datetime_complete and trial.datetime_start else None)
        rows.append({"number": trial.number, "state": trial.state.name, "value": trial.value, "params": trial.params,
                     "epochs_reported": len(trial.intermediate_values), "intermediate": trial.intermediate_values,
                     "seconds": seconds, "retry_of": trial.system_attrs.get("failed_trial")})
    return rows


def render(name: str, metric: str, rows: list[dict[str, Any]], best: int | None) -> str:
    keys = sorted({key for row in rows for key in row["params"]})
    lines = [f"# Study {name}", "", f"Objective: best-epoch validation {metric} (maximised). The test split is not read.", "",
             "| trial | state | " + " | ".join(keys) + f" | validation {metric} | epochs | time (s) |",
             "|" + "---|" * (len(keys) + 5)]
    for row in rows:
        values = " | ".join(f"{row['params'][key]:.4g}" if isinstance(row["params"].get(key), float)
                            else str(row["params"].get(key, "—")) for key in keys)
        if row["state"] == "COMPLETE":
            value = f"{row['value']:.4f}"
        else:  # a pruned or failed trial has no objective: its last reported epoch, in brackets
            value = f"({row['intermediate'][max(row['intermediate'])]:.4f})" if row["intermediate"] else "—"
        seconds = f"{row['seconds']:.0f}" if row["seconds"] is not None else "—"
        mark = " **best**" if row["number"] == best else ""
        lines.append(f"| {row['number']}{mark} | {row['state'].lower()} | {values} | {value} | {row['epochs_reported']} | {seconds} |")
    return "\n".join(lines) + "\n"


def log_trial(trial, values: dict[str, Any], reported: dict[int, float], state: str, metric: str,
              summary: dict[str, Any] | None, model_dir: Path) -> None:
    import mlflow

    with mlflow.start_run(run_name=f"trial {trial.number}", nested=True):
        mlflow.log_params({**values, "trial": trial.number})
        mlflow.set_tag("state", state)
        for epoch, value in sorted(reported.items()):
            mlflow.log_metric(f"validation_{metric}", value, step=epoch)
        if summary is not None:
            mlflow.log_metrics({"objective": summary[f"best_validation_{metric}"], "train_time_s": summary["train_time_s"],
                                "epochs_run": float(summary["epochs_run"]), "peak_rss_mb": summary["peak_rss_mb"]})
            for name in KEPT_FILES:
                if (model_dir / name).exists():
                    mlflow.log_artifact(str(model_dir / name))


def study_run(study, params: Params):
    """The study's MLflow run: reopened when the study resumes (its id is a user attribute of the study)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tuneflow.registry import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("tuneflow-tune")
    run_id = study.user_attrs.get("mlflow_run_id")
    if run_id:
        try:
            return mlflow.start_run(run_id=run_id)
        except MlflowException:
            pass  # another tracking store than the one the study began in
    run = mlflow.start_run(run_name=f"tune {study.study_name}")
    mlflow.log_params({"data.source": params.data.source, "model.base": params.model.base, "train.method": params.train.method,
                       "tune.n_trials": params.tune.n_trials, "tune.pruner": params.tune.pruner, "tune.seed": params.tune.seed,
                       "tune.metric": params.tune.metric})
    study.set_user_attr("mlflow_run_id", run.info.run_id)
    return run


def run_study(params: Params, on_trial: Callable[[str], None] | None = None) -> Study:
    """Create or resume the study, run it to tune.n_trials finished trials, and summarise it (plain function: the
    Prefect task below wraps it, tests call it directly). `on_trial` gets the trials table after each trial."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    cfg, metric = params.tune, params.tune.metric
    space = tuning.method_space(params)
    tuning.check_space(params, space)
    shared = Layout(Path(params.artifacts))
    name = tuning.study_name(params, read_json(shared.gated_data / artifacts.DATA_CARD)["data_hash"])
    url = storage_url(params)
    root = shared.root / artifacts.TUNE / name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=tuning.storage(url, cfg), study_name=name, direction="maximize",
                                sampler=tuning.sampler(cfg), pruner=tuning.pruner(cfg), load_if_exists=True)
    if not study.trials and cfg.include_defaults:
        study.enqueue_trial(tuning.configured_values(params, space))
    optuna.storages.fail_stale_trials(study)  # a trial a killed run left RUNNING: failed, queued again with its values
    finished = sum(trial.state.name in FINISHED for trial in study.trials)
    remaining = max(0, cfg.n_trials - finished)
    progress.say(f"[tuneflow] study {name} ({url}): {finished} trial(s) finished, {remaining} to run")

    def objective(trial: optuna.Trial) -> float:
        first_attempt = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial.study.trials[trial.number])
        # a retry trains in the first attempt's folder, so train resumes from its last checkpoint
        layout = linked_layout(root, shared, f"trial-{trial.number if first_attempt is None else first_attempt:03d}")
        values = tuning.suggest(trial, space)
        # a trial trains once: a stuck configuration scores as stuck instead of paying for the collapse restart
        trial_params = with_overrides(params, f"tune.space.{params.train.method} (trial {trial.number})",
                                      {"train.collapse_restart": False, **values, "artifacts": str(layout.root)})
        callback = tuning.report_callback(trial, metric)
        progress.say(f"[tuneflow] trial {trial.number}: " + ", ".join(f"{key}={value:.4g}" if isinstance(value, float)
                                                                    else f"{key}={value}" for key, value in values.items()))
        try:
            summary = train_trial(trial_params, layout, [callback])
        except optuna.TrialPruned as pruned:
            progress.say(f"[tuneflow] trial {trial.number} pruned: {pruned}")
            log_trial(trial, values, callback.reported, "PRUNED", metric, None, layout.path(artifacts.MODEL))
            raise
        log_trial(trial, values, callback.reported, "COMPLETE", metric, summary, layout.path(artifacts.MODEL))
        progress.say(f"[tuneflow] trial {trial.number}: validation {metric} {summary[f'best_validation_{metric}']:.4f}")
        return summary[f"best_validation_{metric}"]

    def publish_progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial is not None:
            on_trial(render(name, metric, trial_rows(study), None))

    started = time.perf_counter()
    with study_run(study, params):
        if remaining:
            study.optimize(objective, n_trials=remaining, timeout=cfg.timeout_s, gc_after_trial=True,
                           callbacks=[publish_progress])
        rows = trial_rows(study)
        complete = [row for row in rows if row["state"] == "COMPLETE"]
        if not complete:
            raise StageFailed(f"study {name}: no trial completed ({len(rows)} trial(s): "
                              f"{', '.join(sorted({row['state'].lower() for row in rows})) or 'none ran'}); see {root}")
        best = study.best_trial
        import mlflow

        mlflow.log_metric(f"best_validation_{metric}", best.value)
        mlflow.set_tag("best_trial", best.number)
    keep_only_best_model(root, rows, best)
    summary = {"study": name, "storage": url, "method": params.train.method, "metric": f"validation {metric}",
               "n_trials": cfg.n_trials, "pruner": cfg.pruner, "seed": cfg.seed, "best_trial": best.number,
               "best_value": best.value, "best_params": best.params, "seconds_this_run": round(time.perf_counter() - started, 1),
               "trials": rows}
    write_json(root / artifacts.STUDY_JSON, summary)
    (root / artifacts.STUDY_MD).write_text(render(name, metric, rows, best.number), encoding="utf-8")
    return Study(name, url, root, dict(best.params), summary)


def keep_only_best_model(root: Path, rows: list[dict[str, Any]], best) -> None:
    """Trial folders keep their summary, report and curves; only the best trial's keeps its weights."""
    best_folder = f"trial-{(best.system_attrs.get('failed_trial', best.number)):03d}"
    for folder in root.glob("trial-*"):
        model_dir = folder / artifacts.MODEL
        if folder.name == best_folder or not model_dir.is_dir():
            continue
        for path in model_dir.iterdir():
            if path.name not in KEPT_FILES:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


@task(cache_policy=NO_CACHE, retries=0, name="tune-study")
def study_task(params: Params) -> Study:
    def artifact(markdown: str) -> None:
        create_markdown_artifact(markdown=markdown, key="tune-trials", description="tuneflow tune: the trials so far")

    return run_study(params, artifact)


def overlay(study: Study, params: Params, base: dict[str, Any], run_name: str) -> dict[str, Any]:
    """The pipeline the best trial becomes: what the study ran on (the pipeline's and --set overrides) plus its values."""
    carried = {key: value for key, value in base.items() if not key.startswith("tune.") and key != "train.method"}
    return {"description": f"tuneflow tune: best of study {study.name} (trial {study.summary['best_trial']}, "
                           f"{study.summary['metric']} {study.summary['best_value']:.4f}) from {run_name}",
            "method": params.train.method, "set": {**carried, **study.overrides}}


@flow(name="tuneflow-tune", log_prints=True)
def tune(params: Params, base_overrides: dict[str, Any], run_name: str, overlay_path: Path) -> dict[str, Any]:
    """ingest → validate (stage runner, once) → the study (one task) → the overlay pipeline."""
    for stage in ("ingest", "validate"):
        with progress.stage(stage):
            run_stage(STAGES[stage], params)
    study = study_task(params)
    pipeline_name = params.tune.pipeline or f"tuned-{params.train.method}"
    header = (f"# Written by `tuneflow tune` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC); rerunning it rewrites "
              f"this file.\n# Each pipeline: a study's best trial on the validation split. pipelines.yaml includes this file.\n")
    tuning.write_overlay(overlay_path, pipeline_name, overlay(study, params, base_overrides, run_name), header)
    markdown = (study.root / artifacts.STUDY_MD).read_text(encoding="utf-8")
    create_markdown_artifact(markdown=markdown, key="tune-study", description=f"tuneflow tune: study {study.name}")
    print(markdown)
    return {**study.summary, "pipeline": pipeline_name, "overlay": str(overlay_path), "root": str(study.root)}
