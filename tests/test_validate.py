"""The data gate on small constructed frames: contract, nasty cases, fixing, evidence."""

import json

import pandas as pd
import pytest

from conftest import topic_frame
from tasks.ingest import ingest
from tasks.validate import run_checks, validate
from tuneflow.config import DataConfig, ValidationConfig
from tuneflow.text import fold

LABELS = ["money", "music", "sport"]


def make_data(tmp_path, frame, **data):
    source = tmp_path / "data.csv"
    frame.to_csv(source, index=False)
    return ingest(DataConfig(source=str(source), **data), tmp_path / "data").data_dir


def overwrite_split(data_dir, name, frame):
    frame.reset_index(drop=True).to_parquet(data_dir / f"{name}.parquet", index=False)


def by_name(checks):
    return {check.name: check for check in checks}


def splits_of(train, validation, test):
    return {"train": pd.DataFrame(train, columns=["text", "label"]), "validation": pd.DataFrame(validation, columns=["text", "label"]),
            "test": pd.DataFrame(test, columns=["text", "label"])}


def base_rows(per_class=10):
    return [(text, label) for text, label in topic_frame(per_class).itertuples(index=False)]


def test_clean_data_passes_and_writes_contract(tmp_path):
    data_dir = make_data(tmp_path, topic_frame(20))
    result = validate(data_dir, ValidationConfig(), tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert result.passed and report["passed"]
    names = {check["name"] for check in report["checks"]}
    assert names >= {"columns", "not_null", "text_length", "label_set", "min_rows_per_split", "label_conflicts", "class_ratio",
                     "min_class_rows", "min_total_rows", "exact_leakage", "duplicates_within_split", "near_dup_leakage",
                     "near_dup_label_conflicts", "near_dup_within_split"}
    assert all(set(check) >= {"name", "passed", "severity", "value", "threshold", "evidence"} for check in report["checks"])
    # clean but small: a warning, not a failure
    assert [check["name"] for check in report["checks"] if not check["passed"] and check["severity"] != "info"] == ["min_total_rows"]
    # nothing fixed: the gated data is the ingest data, same hash
    card = json.loads((data_dir / "data_card.json").read_text())
    gated = json.loads((tmp_path / "report" / "data" / "data_card.json").read_text())
    assert report["data_hash"] == gated["data_hash"] == card["data_hash"] and gated["counts"] == card["counts"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "report" / "data" / "test.parquet"), pd.read_parquet(data_dir / "test.parquet"))
    assert json.loads((tmp_path / "report" / "fix_diff.json").read_text())["removed"] == []
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    train_counts = pd.read_parquet(data_dir / "train.parquet")["label"].value_counts()
    assert metrics["gate_passed"] is True and metrics["exact_leakage"] == 0
    assert metrics["class_ratio"] == pytest.approx(train_counts.max() / train_counts.min(), abs=1e-3)
    assert "PASSED" in (tmp_path / "report" / "report.md").read_text()


def test_cross_split_leakage_fails_with_evidence(tmp_path):
    # the stable split keeps repeats together: a leak is a copy (after case/space folding) placed in another split
    data_dir = make_data(tmp_path, topic_frame(20))
    train, test = (pd.read_parquet(data_dir / f"{name}.parquet") for name in ("train", "test"))
    overwrite_split(data_dir, "test", pd.concat([test, train.head(5).assign(text=lambda f: f["text"].str.upper() + "  ")]))
    result = validate(data_dir, ValidationConfig(evidence_rows=3), tmp_path / "report")
    leakage = by_name(result.checks)["exact_leakage"]
    assert not result.passed and not leakage.passed and leakage.value > 0 and leakage.severity == "error"
    assert len(leakage.evidence) == 3  # capped at validation.evidence_rows
    group = leakage.evidence[0]
    assert len({place["split"] for place in group}) > 1 and {"split", "row", "label", "text"} <= set(group[0])
    assert by_name(result.checks)["duplicates_within_split"].severity == "warning"
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
    label_set = by_name(validate(data_dir, ValidationConfig(), tmp_path / "r").checks)["label_set"]
    assert not label_set.passed
    found = {item["split"]: item for item in label_set.evidence}
    assert found["train"]["missing_labels"] == ["music"] and found["test"]["unknown_labels"] == ["weather"]


def test_conflicting_labels_differing_only_in_case_and_space():
    rows = base_rows()
    splits = splits_of(rows[:20] + [("Great  match tonight", "sport")], rows[20:25] + [("great match TONIGHT ", "money")], rows[25:])
    checks = by_name(run_checks(splits, LABELS, ValidationConfig())[0])
    conflict = checks["label_conflicts"]
    assert not conflict.passed and conflict.severity == "error" and conflict.value == 1
    assert {(place["split"], place["label"]) for place in conflict.evidence[0]} == {("train", "sport"), ("validation", "money")}


def test_near_duplicate_with_one_word_changed_across_splits():
    text = "the central bank raised interest rates again this quarter as inflation kept climbing across the region"
    rows = base_rows()
    splits = splits_of(rows[:20] + [(text, "money")], rows[20:25], rows[25:] + [(text.replace("again", "sharply"), "money")])
    checks = by_name(run_checks(splits, LABELS, ValidationConfig())[0])
    leak = checks["near_dup_leakage"]
    assert not leak.passed and leak.severity == "error" and leak.value == 1
    pair = leak.evidence[0]
    assert 0.8 <= pair["similarity"] < 1 and {pair["a"]["split"], pair["b"]["split"]} == {"train", "test"}
    assert pair["b"]["row"] == 5 and "sharply" in pair["b"]["text"]
    assert checks["exact_leakage"].passed  # not identical: only the near-duplicate check sees it


def test_near_duplicates_with_different_labels_warn():
    text = "the central bank raised interest rates again this quarter as inflation kept climbing across the region"
    rows = base_rows()
    splits = splits_of(rows[:20] + [(text, "money"), (text.replace("again", "sharply"), "sport")], rows[20:25], rows[25:])
    checks = by_name(run_checks(splits, LABELS, ValidationConfig())[0])
    assert not checks["near_dup_label_conflicts"].passed and checks["near_dup_label_conflicts"].severity == "warning"
    assert checks["near_dup_within_split"].value == 1 and checks["near_dup_within_split"].severity == "info"
    assert checks["near_dup_leakage"].passed and checks["label_conflicts"].passed


def test_not_good_and_good_are_different_texts():
    assert fold("Not  GOOD") == "not good" != fold("good")
    rows = base_rows()
    splits = splits_of(rows[:20] + [("not good", "money")], rows[20:25] + [("good", "sport")], rows[25:] + [("Good", "sport")])
    checks = by_name(run_checks(splits, LABELS, ValidationConfig())[0])
    assert checks["label_conflicts"].passed  # "not good"/money vs "good"/sport is no conflict
    leaked = checks["exact_leakage"]
    assert leaked.value == 1 and {place["text"] for place in leaked.evidence[0]} == {"good", "Good"}


def test_imbalance_15_to_1_fails_with_class_counts():
    rows = [(f"spam offer number {i} click now", "spam") for i in range(150)] + [(f"meeting notes draft {i} for team", "ham") for i in range(10)]
    splits = splits_of(rows, [("spam offer today", "spam"), ("ham notes", "ham")], [("spam deal", "spam"), ("ham memo", "ham")])
    ratio = by_name(run_checks(splits, ["ham", "spam"], ValidationConfig(near_dup_jaccard=1.0))[0])["class_ratio"]
    assert not ratio.passed and ratio.severity == "error" and ratio.value == 15.0 and ratio.threshold == 10
    assert ratio.evidence == [{"ham": 10, "spam": 150}]


def test_too_few_rows_of_a_class_fails():
    rows = base_rows()
    sport, money, music = rows[:10], rows[10:20], rows[20:]
    splits = splits_of(sport[:8] + music[:8] + money[:1], sport[8:] + music[8:] + money[1:5], money[5:])
    check = by_name(run_checks(splits, LABELS, ValidationConfig(max_class_ratio=100))[0])["min_class_rows"]
    assert not check.passed and check.evidence == [{"money": 1}]


def test_label_with_trailing_whitespace_variant(tmp_path):
    rows = [(f"win a prize number {i}", "spam") for i in range(6)] + [(f"lunch at noon {i}", "ham") for i in range(6)]
    splits = splits_of(rows[:3] + rows[6:9], rows[3:4] + rows[9:10], [("win a car today", "spam "), *rows[10:12]])
    label_set = by_name(run_checks(splits, ["ham", "spam"], ValidationConfig())[0])["label_set"]
    assert not label_set.passed and label_set.evidence[0]["unknown_labels"] == ["spam "]
    # ingest strips the variant, so the gate sees one class
    frame = pd.DataFrame(rows + [(f"free money {i}", "spam ") for i in range(3)], columns=["text", "label"])
    source = tmp_path / "spam.csv"
    frame.to_csv(source, index=False)
    assert ingest(DataConfig(source=str(source)), tmp_path / "data").labels == ["ham", "spam"]


def test_fix_removes_leaked_and_conflicting_rows_but_never_train(tmp_path):
    data_dir = make_data(tmp_path, topic_frame(20))
    train_before = pd.read_parquet(data_dir / "train.parquet")
    validation, test = (pd.read_parquet(data_dir / f"{name}.parquet") for name in ("validation", "test"))
    copies = train_before.assign(text=lambda f: f["text"].str.title())
    overwrite_split(data_dir, "validation", pd.concat([validation, copies.iloc[1:4],
                                                       pd.DataFrame([{"text": train_before["text"][0].upper(), "label": "zzz"}])]))
    overwrite_split(data_dir, "test", pd.concat([test, copies.iloc[4:6]]))
    result = validate(data_dir, ValidationConfig(fix=True, evidence_rows=100), tmp_path / "report")
    assert result.passed
    diff = json.loads((tmp_path / "report" / "fix_diff.json").read_text())
    assert diff["removed_rows"] == len(diff["removed"]) > 0
    assert {item["split"] for item in diff["removed"]} <= {"validation", "test"}
    assert all({"split", "row", "label", "text", "reason"} <= set(item) for item in diff["removed"])
    assert any(item["reason"].startswith("label_conflicts") and item["label"] == "zzz" for item in diff["removed"])
    assert any(item["reason"].startswith("exact_leakage") for item in diff["removed"])
    gated = tmp_path / "report" / "data"
    pd.testing.assert_frame_equal(pd.read_parquet(gated / "train.parquet"), train_before)
    card, source_card = (json.loads((folder / "data_card.json").read_text()) for folder in (gated, data_dir))
    removed_from_test = sum(item["split"] == "test" for item in diff["removed"])
    assert card["counts"]["test"] == len(test) + 2 - removed_from_test == len(pd.read_parquet(gated / "test.parquet"))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    # the fix removed exactly the planted rows: the gated data is the ingest's again
    assert report["data_hash"] == card["data_hash"] == source_card["data_hash"] == report["source_data_hash"]
    checks = by_name(result.checks)
    assert checks["exact_leakage"].passed and checks["near_dup_leakage"].passed and checks["fix_removed_rows"].value == len(diff["removed"])


def test_fix_leaves_conflicts_inside_train_failing(tmp_path):
    data_dir = make_data(tmp_path, topic_frame(20))
    train = pd.read_parquet(data_dir / "train.parquet")
    overwrite_split(data_dir, "train", pd.concat([train, pd.DataFrame([{"text": train["text"][0] + " ", "label": "zzz"}])]))
    result = validate(data_dir, ValidationConfig(fix=True), tmp_path / "report")
    assert not result.passed and "label_conflicts" in {check.name for check in result.failed}
    assert result.removed == []


def test_thresholds_come_from_params():
    rows = base_rows()
    text = "the central bank raised interest rates again this quarter as inflation kept climbing across the region"
    splits = splits_of(rows[:20] + [(text, "money")], rows[20:25], rows[25:] + [(text.replace("again", "sharply"), "money")])
    tolerant = by_name(run_checks(splits, LABELS, ValidationConfig(max_near_dup_leak=1))[0])["near_dup_leakage"]
    strict = by_name(run_checks(splits, LABELS, ValidationConfig(near_dup_jaccard=0.95))[0])["near_dup_leakage"]
    assert tolerant.passed and tolerant.value == 1 and strict.passed and strict.value == 0


def test_config_rejects_inverted_length_bounds():
    with pytest.raises(ValueError, match="min_text_chars"):
        ValidationConfig(min_text_chars=10, max_text_chars=5)
