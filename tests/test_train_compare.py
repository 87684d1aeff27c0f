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
    assert sorted(row["method"] for row in table["rows"]) == ["lora", "prompt"]
    # ranked on validation, best first; test is reported, not used
    validation = [row["best_validation_macro_f1"] for row in table["rows"]]
    assert validation == sorted(validation, reverse=True) and [row["rank"] for row in table["rows"]] == [1, 2]
    assert table["ranked_by"] == "best_validation_macro_f1" and table["chosen"] == table["rows"][0]["method"]
    for row in table["rows"]:
        assert row["status"] == "ok" and row["parity_passed"]
        assert row["trainable_params"] > 0 and row["peak_rss_mb"] > 0 and row["weights_mb"] > 0 and row["train_time_s"] > 0
    markdown = (workdir / "artifacts" / "compare" / "comparison.md").read_text()
    assert "| lora |" in markdown and "| prompt |" in markdown and "macro-F1" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| rank |"))
    assert header.split(" | ")[-2:] == ["test macro-F1 (not used to rank)", "test accuracy |"]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tuneflow-compare"])
    assert {"lora", "prompt"} <= set(runs["tags.mlflow.runName"])


def test_compare_rejects_an_unknown_method(workdir):
    result = subprocess.run([str(TUNEFLOW), "compare", "--methods", "lora,nope"], cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 2 and "--methods: unknown method(s) nope" in result.stderr


def test_compare_ranks_on_validation_never_on_test():
    from flows.compare import COLUMNS, rank

    rows = [{"method": "a", "status": "ok", "best_validation_macro_f1": 0.70, "test_macro_f1": 0.90},
            {"method": "b", "status": "ok", "best_validation_macro_f1": 0.80, "test_macro_f1": 0.60},
            {"method": "c", "status": "train failed: boom"},
            {"method": "d", "status": "parity failed", "best_validation_macro_f1": 0.99, "test_macro_f1": 0.99}]
    ranked = rank(rows)
    assert [(row["method"], row.get("rank")) for row in ranked] == [("b", 1), ("a", 2), ("c", None), ("d", None)]
    keys = [key for key, _ in COLUMNS]
    assert keys.index("best_validation_macro_f1") < keys.index("test_macro_f1") and keys[-2:] == ["test_macro_f1", "test_accuracy"]
