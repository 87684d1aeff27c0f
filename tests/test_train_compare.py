"""`tuneflow compare`: several methods on one split, each exported and evaluated, one table + MLflow run."""

from __future__ import annotations

import json
import subprocess

from conftest import TUNEFLOW, topic_frame, write_params


def test_compare_two_methods_writes_one_table(tiny_model, workdir):
    topic_frame(15).to_csv(workdir / "topics.csv", index=False)
    write_params(workdir, data={"source": "topics.csv"}, model={"base": str(tiny_model), "max_length": 24},
                 train={"epochs": 1, "batch_size": 8, "learning_rate": 5e-3},
                 evaluate={"latency_warmup": 1, "pytorch_reference": False})
    result = subprocess.run([str(TUNEFLOW), "compare", "--methods", "lora,prompt", "--set", "train.lora.r=4"],
                            cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((workdir / "artifacts" / "compare" / "comparison.json").read_text())
    assert [row["method"] for row in table["rows"]] == ["lora", "prompt"]
    for row in table["rows"]:
        assert row["status"] == "ok" and row["parity_passed"]
        assert row["trainable_params"] > 0 and row["peak_rss_mb"] > 0 and row["weights_mb"] > 0 and row["train_time_s"] > 0
    markdown = (workdir / "artifacts" / "compare" / "comparison.md").read_text()
    assert "| lora |" in markdown and "| prompt |" in markdown and "macro-F1" in markdown

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tuneflow-compare"])
    assert {"lora", "prompt"} <= set(runs["tags.mlflow.runName"])


def test_compare_rejects_an_unknown_method(workdir):
    result = subprocess.run([str(TUNEFLOW), "compare", "--methods", "lora,nope"], cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 2 and "--methods: unknown method(s) nope" in result.stderr
