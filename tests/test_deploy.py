"""`tuneflow deploy`: Prefect cron deployments built from pipelines.yaml."""

import subprocess

from conftest import TUNEFLOW, copy_repo_files
from flows.retrain import build_deployments
from tuneflow.config import pipeline_params


def test_dry_run_lists_the_scheduled_pipelines(workdir):
    copy_repo_files(workdir, "params.yaml", "pipelines.yaml")
    result = subprocess.run([str(TUNEFLOW), "deploy", "--dry-run"], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bbc-news: 0 3 * * 1 (UTC) → flow tuneflow-scheduled (pipeline=bbc-news)" in result.stdout
    assert "mr-polarity" not in result.stdout  # no schedule: not deployed unless asked for


def test_deployments_carry_cron_and_resolve_params_at_run_time(workdir):
    copy_repo_files(workdir, "params.yaml", "pipelines.yaml")
    (deployment,) = build_deployments("pipelines.yaml", "params.yaml", ["mr-polarity"])
    assert deployment.name == "mr-polarity" and not deployment.schedules
    assert deployment.parameters["pipeline"] == "mr-polarity"
    assert deployment.parameters["params_file"] == str(workdir / "params.yaml")
    name, params = pipeline_params(deployment.parameters["pipeline"], deployment.parameters["params_file"],
                                   deployment.parameters["pipelines_file"])
    assert params.promote.model_name == "tuneflow-mr-polarity" and params.model.max_length == 64


def test_bad_cron_or_override_exits_2(workdir):
    copy_repo_files(workdir, "params.yaml")
    (workdir / "pipelines.yaml").write_text("pipelines:\n  a:\n    schedule: '61 3 * * *'\n")
    result = subprocess.run([str(TUNEFLOW), "deploy", "--dry-run"], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid cron schedule '61 3 * * *'" in result.stderr
    (workdir / "pipelines.yaml").write_text("pipelines:\n  a:\n    schedule: '0 3 * * *'\n    set: {train.epoch: 1}\n")
    result = subprocess.run([str(TUNEFLOW), "deploy", "--dry-run"], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown key 'train.epoch'" in result.stderr
