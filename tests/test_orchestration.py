"""The Prefect driver's reliability settings (orchestration.*), the deploy refusal on an ephemeral API, and a real
Prefect server: a deployment triggered with a parameter override runs every stage and leaves its artifacts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from conftest import TUNEFLOW, copy_repo_files, start_prefect_server, topic_frame, write_params
from flows.retrain import build_deployments, check_orchestration, retrain, transient
from pipeline.table import STAGES
from test_stages import tiny_params
from tuneflow import artifacts as a
from tuneflow.config import Params, load_params
from tuneflow.errors import DataGateFailed, InputError
from tuneflow.registry import Registry, RegistryError


def test_only_transient_failures_are_retried():
    assert transient(RegistryError("registry sqlite:///x: reading m@champion failed: database is locked"))
    assert transient(OSError(5, "Input/output error")) and transient(ConnectionResetError())
    for final in (InputError("data.source: file not found"), DataGateFailed("gate"), FileNotFoundError("x"),
                  PermissionError("x"), TimeoutError("stage ran past its timeout"), ValueError("a bug"), None):
        assert not transient(final), final


def test_timeouts_name_known_stages_and_positive_seconds(tmp_path):
    check_orchestration(Params.model_validate({"orchestration": {"timeout_s": {"train": 7200, "evaluate": 60}}}))
    with pytest.raises(InputError, match=r"orchestration.timeout_s: unknown stage\(s\) trian; stages are ingest, validate"):
        check_orchestration(Params.model_validate({"orchestration": {"timeout_s": {"trian": 60}}}))
    (tmp_path / "params.yaml").write_text("orchestration:\n  timeout_s: {train: 0}\n")
    with pytest.raises(InputError, match=r"orchestration.timeout_s.*above 0 seconds"):
        load_params(tmp_path / "params.yaml")


def test_deployments_run_one_at_a_time_on_their_time_zone(workdir):
    copy_repo_files(workdir, "params.yaml")
    (workdir / "pipelines.yaml").write_text("pipelines:\n  nightly:\n    schedule: '30 2 * * *'\n    timezone: Europe/Berlin\n")
    (deployment,) = build_deployments("pipelines.yaml", "params.yaml")
    assert [(entry.schedule.cron, entry.schedule.timezone) for entry in deployment.schedules] == [("30 2 * * *", "Europe/Berlin")]
    assert deployment.concurrency_limit == 1 and deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
    (workdir / "pipelines.yaml").write_text("pipelines:\n  nightly:\n    schedule: '30 2 * * *'\n    timezone: Mars/Olympus\n")
    result = subprocess.run([str(TUNEFLOW), "deploy", "--dry-run"], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown time zone 'Mars/Olympus'" in result.stderr


def test_deploy_on_an_ephemeral_api_says_schedules_would_not_fire(workdir, monkeypatch):
    copy_repo_files(workdir, "params.yaml", "pipelines.yaml")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    result = subprocess.run([str(TUNEFLOW), "deploy"], cwd=workdir, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "tuneflow: error: PREFECT_API_URL is not set: deployments served on Prefect's ephemeral server never fire their "
        "schedules; start a server (`make server`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_registry_down_for_the_first_attempt_is_retried(tiny_model, workdir, prefect_server, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", prefect_server["PREFECT_API_URL"])
    params = tiny_params(tiny_model, workdir, epochs=1)
    params = params.model_copy(update={"orchestration": params.orchestration.model_copy(update={"retries": 1, "retry_delay_s": 0})})
    lookups = []
    real_by_alias = Registry.by_alias

    def down_once(self, name, alias):
        lookups.append(alias)
        if len(lookups) == 1:
            raise RegistryError("registry http://127.0.0.1:5000: reading tiny@champion failed: Connection refused")
        return real_by_alias(self, name, alias)

    monkeypatch.setattr(Registry, "by_alias", down_once)
    rows = retrain(params=params, run_name="retry")
    assert dict(rows)["registry"].startswith("tiny v1 @champion") and len(lookups) >= 2

    def refused(self, name, alias):
        lookups.append("refused")
        raise InputError("promote.model_name: refused")

    monkeypatch.setattr(Registry, "by_alias", refused)
    with pytest.raises(InputError, match="refused"):
        retrain(params=params, run_name="refused")
    assert lookups.count("refused") == 1  # a refusal is final: not retried


@pytest.mark.slow
@pytest.mark.timeout(900, method="thread")  # pytest-timeout's SIGALRM would take the alarm Prefect's timeout uses
def test_a_stage_past_its_timeout_stops_the_run_in_one_line(tiny_model, tmp_path, prefect_server):
    """In a fresh `tuneflow run` process, as users run it: Prefect interrupts the stage with an alarm signal."""
    topic_frame(30).to_csv(tmp_path / "topics.csv", index=False)
    write_params(tmp_path, data={"source": "topics.csv"}, model={"base": str(tiny_model), "max_length": 32},
                 train={"method": "full", "epochs": 3, "batch_size": 8}, orchestration={"timeout_s": {"train": 2}})
    result = subprocess.run([str(TUNEFLOW), "run"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "tuneflow: error: train stopped after orchestration.timeout_s.train = 2 s"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "artifacts" / a.MODEL).exists()  # nothing half-written: train publishes by rename


@pytest.mark.slow
def test_a_deployment_triggered_on_a_real_server_runs_every_stage_with_its_artifacts(tiny_model, tmp_path):
    """`tuneflow deploy` serving against a `prefect server start` on loopback; the run triggered through the Prefect CLI with
    a parameter override; the API then holds the named flow run, one completed task run per stage and the artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    folder = tmp_path
    topic_frame(30).to_csv(folder / "topics.csv", index=False)
    write_params(folder, data={"source": "topics.csv"}, model={"base": str(tiny_model), "max_length": 32},
                 # the collapse restart off: a tiny model's one epoch may learn nothing, and a restart adds an epoch
                 train={"method": "full", "epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "collapse_restart": False},
                 evaluate={"latency_warmup": 2, "min_accuracy": 0.0, "min_macro_f1": 0.0, "pytorch_reference": False},
                 promote={"model_name": "served-tiny"})
    (folder / "pipelines.yaml").write_text("pipelines:\n  tiny:\n    description: tiny topics\n")
    # with its services: the server records task runs from their events in one of them
    server, server_env = start_prefect_server(folder / ".prefect", services=True)
    env = {**server_env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    serving = subprocess.Popen([str(TUNEFLOW), "deploy", "--pipeline", "tiny"], cwd=folder, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        prefect = str(TUNEFLOW.parent / "prefect")
        for _ in range(120):
            listed = subprocess.run([prefect, "deployment", "ls"], env=env, capture_output=True, text=True, timeout=60)
            if "tuneflow-scheduled/tiny" in listed.stdout:
                break
            assert serving.poll() is None, serving.stderr.read()
            time.sleep(1)
        flow_run_ids = []
        for _ in range(2):  # the second is due while the first runs: the deployment's concurrency limit queues it
            triggered = subprocess.run([prefect, "deployment", "run", "tuneflow-scheduled/tiny", "--param",
                                        'overrides={"train.epochs": 1}'], env=env, capture_output=True, text=True, timeout=60)
            assert triggered.returncode == 0, triggered.stdout + triggered.stderr
            flow_run_ids += re.findall(r"UUID:?\s+([0-9a-f-]{36})", triggered.stdout)[:1] or [triggered.stdout]
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            for _ in range(900):
                flow_runs = [client.read_flow_run(flow_run_id) for flow_run_id in flow_run_ids]
                if all(run.state and run.state.is_final() for run in flow_runs):
                    break
                time.sleep(1)
            first, second = sorted(flow_runs, key=lambda run: run.start_time or run.expected_start_time)
            # the deployment's run calls the pipeline flow: its stages are task runs of that subflow
            (pipeline_run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[first.id])))
            only_first = FlowRunFilter(id=FlowRunFilterId(any_=[pipeline_run.id]))
            tasks = client.read_task_runs(flow_run_filter=only_first)
            keys = {artifact.key for artifact in client.read_artifacts(flow_run_filter=only_first)}
    finally:
        serving.terminate()
        serving.wait(60)
        server.terminate()
        server.wait(30)
    assert all(run.state.is_completed() for run in flow_runs), [run.state for run in flow_runs]
    assert second.start_time >= first.end_time  # one at a time: no mixed artifacts, no promotions racing
    versions = Registry(env["MLFLOW_TRACKING_URI"]).client.search_model_versions("name='served-tiny'")
    assert len(versions) == 1  # the second run found the same artifact already champion: nothing registered twice
    root = folder / "artifacts" / a.PIPELINES / "tiny"  # the pipeline's own artifacts root
    card = json.loads((root / a.DATA / a.DATA_CARD).read_text())
    assert first.name == pipeline_run.name == f"tiny · data {card['data_hash'][:12]} · full"
    states = {}
    for task_run in tasks:
        states.setdefault(task_run.name.rsplit("-", 1)[0], []).append(task_run.state_name)
    assert set(states) == set(STAGES) and all(names == ["Completed"] for names in states.values()), states
    assert {"data-gate", "evaluation-gate", "latency", "promotion", "validate-report", "evaluate-report"} <= keys, keys
    summary = json.loads((root / a.MODEL / a.TRAIN_SUMMARY).read_text())
    assert summary["epochs_run"] == 1  # the trigger-time override, not params.yaml's 2 epochs


@pytest.mark.slow
def test_a_per_minute_cron_fires_on_a_real_server(tiny_model, tmp_path):
    """Nothing triggered by hand: the server's scheduler creates the run from the pipeline's cron and `tuneflow deploy`
    runs it to Completed. (With SQLAlchemy 2.1 Prefect 3.8.8's scheduler fails every loop and no run is ever created,
    hence the pin in pyproject.toml.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    folder = tmp_path
    topic_frame(20).to_csv(folder / "topics.csv", index=False)
    write_params(folder, data={"source": "topics.csv"}, model={"base": str(tiny_model), "max_length": 32},
                 train={"method": "full", "epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "collapse_restart": False},
                 evaluate={"latency_warmup": 2, "min_accuracy": 0.0, "min_macro_f1": 0.0, "pytorch_reference": False,
                           "throughput_texts": 32},
                 promote={"model_name": "cron-tiny"})
    (folder / "pipelines.yaml").write_text('pipelines:\n  tiny:\n    description: tiny topics\n    schedule: "* * * * *"\n')
    server, server_env = start_prefect_server(folder / ".prefect", services=True)  # the scheduler is a service
    env = {**server_env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    serving = subprocess.Popen([str(TUNEFLOW), "deploy", "--pipeline", "tiny"], cwd=folder, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    fired = []
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not fired:
                assert serving.poll() is None, serving.stderr.read()[-3000:]
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["tiny"])))
                fired = [run for run in runs if run.auto_scheduled and run.state and run.state.is_final()]
                time.sleep(2)
    finally:
        serving.terminate()
        serving.wait(60)
        server.terminate()
        server.wait(30)
    assert fired, "the per-minute cron created no run that ended within 600 s"
    assert fired[0].state.is_completed(), fired[0].state
    assert fired[0].expected_start_time.second == 0  # a cron slot, not a trigger
    versions = Registry(env["MLFLOW_TRACKING_URI"]).client.search_model_versions("name='cron-tiny'")
    assert len(versions) == 1


def test_the_prefect_yaml_variants_name_real_flows_parameters_and_pipelines():
    """deploy/prefect.yaml (process, Docker and Kubernetes work pools): parsed, not run — those platforms are not here."""
    import importlib
    import inspect

    import yaml
    from prefect.client.schemas.schedules import CronSchedule

    from conftest import REPO
    from tuneflow.config import load_pipelines

    document = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    pipelines = load_pipelines(REPO / "pipelines.yaml").pipelines
    pools = set()
    for deployment in document["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        module = path.removesuffix(".py").replace("/", ".")
        flow = getattr(importlib.import_module(module), function)
        assert set(deployment["parameters"]) <= set(inspect.signature(flow.fn).parameters), deployment["name"]
        assert deployment["parameters"]["pipeline"] in pipelines
        assert (REPO / deployment["parameters"]["params_file"]).exists()
        for schedule in deployment["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
        assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
        pools.add(deployment["work_pool"]["name"])
    assert pools == {"tuneflow-process", "tuneflow-docker", "tuneflow-kubernetes"}


@pytest.mark.slow
def test_a_watch_deployment_retrains_only_when_the_data_changes(tiny_model, workdir, prefect_server, monkeypatch):
    from flows.retrain import retrain_on_data_change

    monkeypatch.setenv("PREFECT_API_URL", prefect_server["PREFECT_API_URL"])
    topic_frame(30).to_csv(workdir / "topics.csv", index=False)
    write_params(workdir, data={"source": "topics.csv"}, model={"base": str(tiny_model), "max_length": 32},
                 train={"method": "full", "epochs": 1, "batch_size": 8, "learning_rate": 5e-3},
                 evaluate={"latency_warmup": 2, "min_accuracy": 0.0, "min_macro_f1": 0.0, "pytorch_reference": False,
                           "non_inferiority_margin": 1.0},
                 promote={"model_name": "watched"})
    (workdir / "pipelines.yaml").write_text("pipelines:\n  topics:\n    watch: '*/5 * * * *'\n")
    (deployment,) = build_deployments("pipelines.yaml", "params.yaml")
    assert deployment.name == "topics-on-data-change" and deployment.schedules[0].schedule.cron == "*/5 * * * *"

    def versions() -> int:
        return len(Registry().client.search_model_versions("name='watched'"))

    assert retrain_on_data_change("topics") == "retrained" and versions() == 1
    assert retrain_on_data_change("topics") == "unchanged" and versions() == 1
    frame = topic_frame(30)
    frame.iloc[:3, 0] = frame.iloc[:3, 0] + " a new sentence for this row"
    frame.to_csv(workdir / "topics.csv", index=False)
    assert retrain_on_data_change("topics") == "retrained" and versions() == 2


def test_training_logs_readable_progress_lines_and_writes_the_curves_dvc_plots(tiny_model, workdir, capfd):
    """stderr is not a terminal here (as under Prefect or CI): no progress bar, a line per evaluation; and the curves
    as data by step, which dvc.yaml's plots name."""
    import pandas as pd

    from cli.dvc_yaml import dvc_document
    from test_stages import run_until

    params = tiny_params(tiny_model, workdir, epochs=2)
    out = run_until(params, "train")
    err = capfd.readouterr().err
    evaluations = [line for line in err.splitlines() if "[tuneflow] train: step" in line and "validation macro-F1" in line]
    assert len(evaluations) == 2, err[-2000:]
    assert "it/s]" not in err and "{'loss'" not in err  # neither a tqdm bar nor the Trainer's printed log dicts
    train_curve, validation_curve = pd.read_csv(out.model / a.TRAIN_CURVE), pd.read_csv(out.model / a.VALIDATION_CURVE)
    assert len(validation_curve) == 2 and list(validation_curve.columns) == ["step", "loss", "macro_f1", "accuracy"]
    assert len(train_curve) >= 2 and train_curve["step"].is_monotonic_increasing
    plots = dvc_document(params)["plots"]
    assert {f"{params.artifacts}/{a.MODEL}/{a.VALIDATION_CURVE}": {"x": "step", "y": ["loss", "macro_f1", "accuracy"]}} in plots
