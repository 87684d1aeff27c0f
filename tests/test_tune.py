"""`tuneflow tune`: an Optuna study on validation that prunes, resumes after a kill, never reads the test split,
and leaves an overlay pipeline that `tuneflow run --pipeline` resolves to the best values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from conftest import TUNEFLOW, gated_params, topic_frame, write_params

# trial 0 is the configured lr (1e-2: the tiny model moves off its start in an epoch); the other choice, 1e-9, leaves
# it where it starts, and TPE's first random draws (seed 0) pick it: that trial trails trial 0 at epoch 1, and the
# median pruner (one finished trial first) stops it there.
SPACE = {"train.learning_rate": {"choices": [1e-2, 1e-9]}}
TRAIN = {"method": "full", "epochs": 2, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
         "early_stopping_patience": 5}
TUNE = {"n_trials": 3, "seed": 0, "n_startup_trials": 3, "pruner": "median", "pruner_startup_trials": 1,
        "space": {"full": SPACE}}
ROWS_PER_CLASS = 40


@pytest.mark.slow  # three tiny trainings: 130 s measured on the shared 2-core machine under load
def test_study_prunes_and_never_reads_the_test_split(tiny_model, workdir, monkeypatch):
    import mlflow
    import pandas as pd

    from flows.tune import run_study
    from tuneflow import artifacts

    params = gated_params(workdir, topic_frame(ROWS_PER_CLASS), model={"base": str(tiny_model), "max_length": 24}, train=TRAIN, tune=TUNE)
    # the gate has run: from here on nothing may read the test split; it is gone, and every parquet read is recorded
    for data_dir in (workdir / "artifacts" / artifacts.DATA, workdir / "artifacts" / artifacts.VALIDATION / artifacts.GATED_DATA):
        (data_dir / artifacts.split_file("test")).unlink()
    reads: list[str] = []
    real_read = pd.read_parquet
    monkeypatch.setattr(pd, "read_parquet", lambda path, *a, **k: reads.append(str(path)) or real_read(path, *a, **k))

    study = run_study(params)

    assert reads and not [path for path in reads if "test" in os.path.basename(path)]
    trials = study.summary["trials"]
    assert len(trials) == 3
    assert trials[0]["params"] == {"train.learning_rate": 1e-2}  # the configured value, enqueued as trial 0
    pruned = [trial for trial in trials if trial["state"] == "PRUNED"]
    assert pruned and all(trial["epochs_reported"] == 1 for trial in pruned)  # stopped after epoch 1 of 2
    assert study.summary["best_trial"] == 0 and study.overrides == {"train.learning_rate": 1e-2}
    assert json.loads((study.root / artifacts.STUDY_JSON).read_text())["best_value"] == study.summary["best_value"]
    # trials train once: the collapse restart (on in params) is off inside a study
    summaries = sorted(study.root.glob(f"trial-*/**/{artifacts.TRAIN_SUMMARY}"))
    assert len(summaries) == sum(trial["state"] == "COMPLETE" for trial in trials) == 2
    assert all(not json.loads(path.read_text())["collapse_restart"]["enabled"] for path in summaries)

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tuneflow-tune"])
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parent) == 1 and len(children) == 3
    assert set(children["tags.mlflow.parentRunId"]) == set(parent["run_id"])
    assert sorted(children["tags.state"]) == sorted(trial["state"] for trial in trials)


def test_a_bad_space_is_one_line_and_exit_2(workdir):
    write_params(workdir)
    cases = [(["--set", "train.method=prompt"], "tune.space.prompt: no search space for train.method=prompt"),
             (["--set", "tune.space={lora: {train.nope: {low: 1, high: 2}}}"], "lora: unknown key 'train.nope'"),
             (["--set", "tune.space={lora: {train.lora.r: {choices: [0]}}}"], "tune.space.lora: invalid value for 'train.lora.r'"),
             (["--set", "tune.pruner=sometimes"], "invalid value for 'tune.pruner'")]
    for overrides, message in cases:
        result = subprocess.run([str(TUNEFLOW), "tune", *overrides], cwd=workdir, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (overrides, result.stderr[-2000:])
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_a_killed_study_resumes_and_its_overlay_runs_the_best_values(tiny_model, workdir, monkeypatch):
    import optuna

    from tuneflow.config import pipeline_params

    topic_frame(ROWS_PER_CLASS).to_csv(workdir / "topics.csv", index=False)
    write_params(workdir, data={"source": "topics.csv"}, model={"base": str(tiny_model), "max_length": 24},
                 train=TRAIN, tune={**TUNE, "heartbeat_s": 1})
    (workdir / "pipelines.yaml").write_text(yaml.safe_dump({"include": ["pipelines.tuned.yaml"], "pipelines": {}}))
    command = [str(TUNEFLOW), "tune", "--set", "train.weight_decay=0.02"]

    first = subprocess.Popen(command, cwd=workdir, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    # kill the whole process group as soon as trial 1 starts (its heartbeat is recorded before the objective prints):
    # a 1e-9 trial can finish and be pruned within a second on a fast CPU
    for line in first.stderr:
        if "[tuneflow] trial 1:" in line:
            os.killpg(first.pid, signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    storage = f"sqlite:///{workdir / 'artifacts' / 'tune' / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)
    before = optuna.load_study(study_name=name, storage=storage).trials
    assert [trial.state.name for trial in before] == ["COMPLETE", "RUNNING"]
    time.sleep(2.5)  # past the grace period (2 heartbeats): the next run sees trial 1 as dead

    second = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    after = optuna.load_study(study_name=name, storage=storage).trials
    states = [trial.state.name for trial in after]
    assert states[:2] == ["COMPLETE", "FAIL"] and sum(state in ("COMPLETE", "PRUNED") for state in states) == 3
    assert after[0].datetime_start == before[0].datetime_start  # the finished trial was kept, not rerun
    retry = after[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == before[1].params  # the killed trial, again

    best = optuna.load_study(study_name=name, storage=storage).best_trial
    overlay = yaml.safe_load((workdir / "pipelines.tuned.yaml").read_text())["pipelines"]["tuned-full"]
    assert overlay["set"]["train.learning_rate"] == best.params["train.learning_rate"]
    run_name, params = pipeline_params("tuned-full", workdir / "params.yaml", workdir / "pipelines.yaml")
    assert run_name == "tuned-full" and params.train.method == "full"
    assert params.train.learning_rate == best.params["train.learning_rate"]
    assert params.train.weight_decay == 0.02  # what the study ran with (--set) travels with the overlay
    assert "tuneflow run --pipeline tuned-full" in second.stdout
