import json

import pandas as pd

from conftest import topic_frame
from tasks.ingest import ingest
from tasks.validate import validate
from tuneflow.config import DataConfig, ValidationConfig


def make_data(tmp_path, frame, **data):
    source = tmp_path / "data.csv"
    frame.to_csv(source, index=False)
    return ingest(DataConfig(source=str(source), **data), tmp_path / "data").data_dir


def overwrite_split(data_dir, name, frame):
    frame.reset_index(drop=True).to_parquet(data_dir / f"{name}.parquet", index=False)


def test_clean_data_passes_and_writes_contract(tmp_path):
    result = validate(make_data(tmp_path, topic_frame(20)), ValidationConfig(), tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert result.passed and report["passed"]
    assert {check["name"] for check in report["checks"]} >= {"schema", "non_empty_text", "label_set", "exact_leakage"}
    assert set(report["checks"][0]) >= {"name", "passed", "severity", "value", "threshold", "evidence"}
    assert len(report["data_hash"]) == 64
    assert "PASSED" in (tmp_path / "report" / "report.md").read_text()


def test_cross_split_leakage_fails_with_evidence(tmp_path):
    # dedup off: exact repeats (after case/space folding) land in different splits
    frame = pd.concat([topic_frame(20), topic_frame(20).assign(text=lambda f: f["text"].str.upper() + "  ")])
    data_dir = make_data(tmp_path, frame, dedup=False)
    result = validate(data_dir, ValidationConfig(evidence_rows=3), tmp_path / "report")
    leakage = next(check for check in result.checks if check.name == "exact_leakage")
    assert not result.passed and not leakage.passed and leakage.value > 0
    assert len(leakage.evidence) == 3
    group = leakage.evidence[0]
    assert len({place["split"] for place in group}) > 1 and {"split", "row", "label", "text"} <= set(group[0])
    assert "FAILED" in (tmp_path / "report" / "report.md").read_text()


def test_dedup_removes_that_leakage(tmp_path):
    frame = pd.concat([topic_frame(20), topic_frame(20).assign(text=lambda f: f["text"].str.upper())])
    assert validate(make_data(tmp_path, frame), ValidationConfig(), tmp_path / "report").passed


def test_class_missing_from_train_and_unknown_label(tmp_path):
    data_dir = make_data(tmp_path, topic_frame(20))
    train = pd.read_parquet(data_dir / "train.parquet")
    overwrite_split(data_dir, "train", train[train["label"] != "music"])
    test = pd.read_parquet(data_dir / "test.parquet")
    test.loc[0, "label"] = "weather"
    overwrite_split(data_dir, "test", test)
    label_set = next(check for check in validate(data_dir, ValidationConfig(), tmp_path / "r").checks if check.name == "label_set")
    assert not label_set.passed
    by_split = {item["split"]: item for item in label_set.evidence}
    assert by_split["train"]["missing_labels"] == ["music"] and by_split["test"]["unknown_labels"] == ["weather"]
