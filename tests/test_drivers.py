"""Both drivers on one stage table (tiny model, real subprocesses): the same configuration, caching on the same
things DVC hashes, the data file as a dependency, experiments that leave @champion alone."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import TUNEFLOW, copy_repo_files, topic_frame, write_params
from pipeline.table import STAGES
from tuneflow import artifacts as a
from tuneflow.registry import Registry

pytestmark = pytest.mark.slow
CACHEABLE = [name for name, stage in STAGES.items() if stage.cache]
LIVE = {name: "Completed" for name, stage in STAGES.items() if not stage.cache}  # champion and promote read the registry


def tiny_project(folder: Path, tiny_model: Path) -> None:
    """params.yaml that differs from the shipped pipelines.yaml's overlays (method full), and a small topic CSV."""
    copy_repo_files(folder, "pipelines.yaml")
    topic_frame(30).to_csv(folder / "topics.csv", index=False)
    write_params(folder, data={"source": "topics.csv"}, model={"base": str(tiny_model), "max_length": 32},
                 train={"method": "full", "epochs": 1, "batch_size": 8, "learning_rate": 5e-3},
                 evaluate={"latency_warmup": 2, "min_accuracy": 0.0, "min_macro_f1": 0.0, "pytorch_reference": False}, promote={"model_name": "drivers-tiny"})


def run(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def params_records(folder: Path) -> dict[str, dict]:
    return {name: json.loads((folder / "artifacts" / stage.output / a.PARAMS).read_text()) for name, stage in STAGES.items()}


def task_states(folder: Path) -> list[dict[str, str]]:
    """Per flow run (oldest first), each task run's state, read from the Prefect database the run left behind."""
    with sqlite3.connect(folder / ".prefect" / "prefect.db") as db:
        rows = db.execute("SELECT flow_run.id, task_run.name, task_run.state_name FROM task_run "
                          "JOIN flow_run ON flow_run.id = task_run.flow_run_id ORDER BY flow_run.start_time").fetchall()
    runs: dict[str, dict[str, str]] = {}
    for flow_run, task_name, state in rows:
        runs.setdefault(flow_run, {})[task_name.rsplit("-", 1)[0]] = state
    return list(runs.values())


@pytest.fixture(scope="module")
def prefect_project(tiny_model, tmp_path_factory):
    """A project after one `tuneflow run`, with the params each stage recorded then."""
    folder = tmp_path_factory.mktemp("prefect")
    tiny_project(folder, tiny_model)
    env = {**os.environ, "PREFECT_HOME": str(folder / ".prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    result = run(folder, str(TUNEFLOW), "run", env=env)
    assert "'params.yaml' through Prefect" in result.stderr and "tuneflow run · params.yaml" in result.stdout
    return folder, env, params_records(folder)


def test_the_resolved_params_are_written_beside_the_artifacts_and_logged_to_mlflow(prefect_project):
    import mlflow
    import yaml

    folder, env, _ = prefect_project
    recorded = json.loads((folder / "artifacts" / a.PROMOTION / a.PARAMS).read_text())
    assert recorded.pop("run") == "params.yaml" and recorded.pop("stage") == "promote"
    assert recorded["train"]["method"] == "full" and recorded["data"]["source"] == "topics.csv"  # params.yaml, no overlay
    run_id = json.loads((folder / "artifacts" / a.PROMOTION / a.DECISION).read_text())["run_id"]
    logged = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=a.RESOLVED_PARAMS,
                                                 dst_path=str(folder / "downloaded"), tracking_uri=env["MLFLOW_TRACKING_URI"])
    assert yaml.safe_load(Path(logged).read_text()) == recorded


def test_prefect_skips_unchanged_stages_and_reruns_what_changed(prefect_project):
    folder, env, _ = prefect_project
    # the first run promoted v1: the gate is re-run against that champion (its own file), then nothing changes
    second = run(folder, str(TUNEFLOW), "run", env=env)
    assert "▶ evaluate …" in second.stderr and "✔ train cached" in second.stderr
    third = run(folder, str(TUNEFLOW), "run", env=env)
    for name in CACHEABLE:
        assert f"✔ {name} cached" in third.stderr and f"▶ {name} …" not in third.stderr
    assert "▶ champion …" in third.stderr and "▶ promote …" in third.stderr  # never cached: they read the live registry
    states = task_states(folder)
    assert states[0] == {name: "Completed" for name in STAGES}
    assert states[1] == {name: "Cached" for name in CACHEABLE} | LIVE | {"evaluate": "Completed"}
    assert states[2] == {name: "Cached" for name in CACHEABLE} | LIVE

    # a stage whose output folder changed since the cached run is run again, and so is what reads it
    (folder / "artifacts" / a.EVAL / a.VERDICT).unlink()
    fourth = run(folder, str(TUNEFLOW), "run", env=env)
    assert "evaluate: cached result, but eval/ changed since; running it again" in fourth.stderr
    assert (folder / "artifacts" / a.EVAL / a.VERDICT).exists()

    # changed data: every stage runs again
    topic_frame(31).to_csv(folder / "topics.csv", index=False)
    fifth = run(folder, str(TUNEFLOW), "run", env=env)
    assert all(f"▶ {name} …" in fifth.stderr for name in STAGES)
    assert task_states(folder)[-1] == {name: "Completed" for name in STAGES}


def test_dvc_runs_the_same_configuration_tracks_the_data_and_keeps_experiments_out_of_production(prefect_project, tiny_model, workdir):
    _, _, prefect_params = prefect_project
    tiny_project(workdir, tiny_model)
    copy_repo_files(workdir, "dvc.yaml", "tasks", "tuneflow")
    env = {**os.environ, "PATH": f"{TUNEFLOW.parent}{os.pathsep}{os.environ['PATH']}"}
    dvc, git = str(TUNEFLOW.parent / "dvc"), ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    run(workdir, "git", "init", "-q", env=env)
    run(workdir, dvc, "init", "-q", env=env)
    run(workdir, dvc, "add", "topics.csv", env=env)  # how a user versions their own data (README)

    first = run(workdir, dvc, "repro", env=env).stdout
    assert all(f"Running stage '{name}'" in first for name in STAGES)
    # one configuration: both drivers ran every stage with the same resolved params (params.yaml alone)
    assert params_records(workdir) == prefect_params
    assert json.loads((workdir / "artifacts" / a.MODEL / a.TRAIN_SUMMARY).read_text())["method"] == "full"
    assert Registry().by_alias("drivers-tiny", "champion").version == "1"
    # lineage: v1 carries the output hashes dvc.lock holds for the stages before promote
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    recorded = json.loads(Registry().get("drivers-tiny", "1").tags["dvc_lock_outs"])
    assert set(recorded) == {name for name in lock if name != "promote" and lock[name].get("outs")} >= {"train", "export", "evaluate"}
    assert recorded["train"] == {out["path"]: out["md5"] for out in lock["train"]["outs"]}

    second = run(workdir, dvc, "repro", env=env).stdout  # @champion moved to v1: the gate runs against it
    assert "Running stage 'evaluate'" in second and "Running stage 'train'" not in second
    third = run(workdir, dvc, "repro", env=env).stdout
    always = {"source", *(name for name, stage in STAGES.items() if stage.always_changed)}
    assert all(f"Running stage '{name}'" in third for name in always)  # the data and the champion are always looked up ...
    assert not any(f"Running stage '{name}'" in third for name in set(STAGES) - always)  # ... and nothing else runs

    run(workdir, *git, "add", "-A", env=env)
    run(workdir, *git, "commit", "-qm", "baseline", env=env)
    experiment = run(workdir, dvc, "exp", "run", "-n", "two-epochs", "-S", "train.epochs=2", env=env).stdout
    assert "Running stage 'train'" in experiment and "Running stage 'ingest'" not in experiment
    decision = json.loads((workdir / "artifacts" / a.PROMOTION / a.DECISION).read_text())
    assert not decision["promoted"] and decision["alias"] == "challenger" and "DVC experiment two-epochs" in decision["reasons"][0]
    registry = Registry()
    assert registry.by_alias("drivers-tiny", "champion").version == "1"
    assert registry.by_alias("drivers-tiny", "challenger").version == decision["version"] == "2"
    assert "two-epochs" in run(workdir, dvc, "exp", "show", "--md", env=env).stdout
    assert "macro_f1" in run(workdir, dvc, "metrics", "diff", "--all", env=env).stdout
    plots = json.loads(run(workdir, dvc, "plots", "diff", "two-epochs", "--json", env=env).stdout)["data"]
    for plot in (f"artifacts/{a.MODEL}/{a.LOSS_CURVES}", f"artifacts/{a.EVAL}/{a.CONFUSION_MATRIX}", f"artifacts/{a.EVAL}/{a.RELIABILITY_DIAGRAM}"):
        assert {revision for image in plots[plot] for revision in image["revisions"]} == {"workspace", "two-epochs"}

    # a changed data file re-runs ingest and everything after it
    topic_frame(31).to_csv(workdir / "topics.csv", index=False)
    changed = run(workdir, dvc, "repro", env=env).stdout
    assert all(f"Running stage '{name}'" in changed for name in STAGES)
