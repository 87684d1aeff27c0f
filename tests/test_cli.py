"""The `tuneflow` command: exit codes and one-line errors (run as a subprocess, like DVC does)."""

import subprocess

import pandas as pd
import pytest

from conftest import TUNEFLOW, topic_frame, write_params


def tuneflow(cwd, *args):
    return subprocess.run([str(TUNEFLOW), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("tuneflow: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--set", "train.epoch=2"], "unknown key 'train.epoch'"),
        (["--set", "train.epochs=abc"], "invalid value for 'train.epochs'"),
        (["--set", "data.source=missing.csv"], "missing.csv: file not found (data.source)"),
        (["--set", "data.source=data.txt"], "unsupported file type '.txt'"),
        (["--set", "data.text_column=body"], "text column 'body' not found (data.text_column); columns found: text, label"),
        (["--set", "data.source=empty.csv"], "empty.csv: no rows after loading"),
        (["--set", "data.source=one_class.csv"], "only one class ('sport')"),
        (["--set", "data.source=no_labels.csv"], "label column 'label' has no usable value"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(workdir, args, fragment):
    topic_frame(10).to_csv(workdir / "data.csv", index=False)
    topic_frame(10).assign(label="sport").to_csv(workdir / "one_class.csv", index=False)
    topic_frame(10).assign(label="").to_csv(workdir / "no_labels.csv", index=False)
    (workdir / "empty.csv").write_text("text,label\n")
    (workdir / "data.txt").write_text("x")
    write_params(workdir, data={"source": "data.csv"})
    result = tuneflow(workdir, "ingest", *args)
    assert result.returncode == 2
    assert fragment in error_line(result)
    assert "Traceback" not in result.stderr
    assert not (workdir / "artifacts").exists() and not (workdir / "mlflow.db").exists()


def test_unknown_pipeline_exits_2(workdir):
    (workdir / "pipelines.yaml").write_text("pipelines:\n  a: {}\n")
    result = tuneflow(workdir, "run", "--pipeline", "nope")
    assert result.returncode == 2 and "unknown pipeline 'nope'" in error_line(result)


def test_data_gate_failure_exits_3_and_keeps_the_evidence(workdir):
    frame = topic_frame(40)  # a word added to some rows: near-duplicates that the stable split scatters
    leaky = pd.concat([frame, frame.groupby("label").head(8).assign(text=lambda f: f["text"] + " indeed")])
    leaky.to_csv(workdir / "data.csv", index=False)
    write_params(workdir, data={"source": "data.csv", "dedup": False}, validation={"fix": False})  # fail closed
    assert tuneflow(workdir, "ingest").returncode == 0
    result = tuneflow(workdir, "validate")
    assert result.returncode == 3
    assert "data gate failed: near_dup_leakage" in error_line(result)
    assert "FAILED" in (workdir / "artifacts" / "validation" / "report.md").read_text()
    trained = tuneflow(workdir, "train")
    assert trained.returncode == 3 and "training refused" in error_line(trained)
    assert not (workdir / "artifacts" / "model").exists()


@pytest.mark.slow
def test_refusals_under_prefect_are_one_line_with_the_failure_recorded(workdir):
    import sqlite3

    frame = topic_frame(40)
    leaky = pd.concat([frame, frame.groupby("label").head(8).assign(text=lambda f: f["text"] + " indeed")])
    leaky.to_csv(workdir / "data.csv", index=False)
    write_params(workdir, data={"source": "data.csv", "dedup": False}, validation={"fix": False})
    gate = tuneflow(workdir, "run")
    assert gate.returncode == 3 and "data gate failed: near_dup_leakage" in error_line(gate)
    assert "FAILED" in (workdir / "artifacts" / "validation" / "report.md").read_text()
    missing = tuneflow(workdir, "run", "--set", "data.source=missing.csv")
    assert missing.returncode == 2 and "missing.csv: file not found" in error_line(missing)
    for result in (gate, missing):
        assert "Traceback" not in result.stderr
    with sqlite3.connect(workdir / ".prefect" / "prefect.db") as db:  # the UI still shows both runs failed
        flows = db.execute("SELECT state_name FROM flow_run ORDER BY start_time").fetchall()
        tasks = db.execute("SELECT name, state_name FROM task_run ORDER BY start_time").fetchall()
    assert flows == [("Failed",), ("Failed",)]
    assert [(name.rsplit("-", 1)[0], state) for name, state in tasks] == [
        ("ingest", "Completed"), ("validate", "Failed"), ("ingest", "Failed")]


def test_python_dash_m_entry_point(workdir):
    import sys

    result = subprocess.run([sys.executable, "-m", "cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "ingest" in result.stdout and "promote" in result.stdout
