"""The data gate on bad input (explicit check failures or one-line errors, never a traceback) and through the CLI."""

import json
import os

import pandas as pd
import pytest

from conftest import topic_frame, write_params
from tasks.validate import run_checks
from tuneflow.config import ValidationConfig
from tuneflow.errors import DataGateFailed, InputError
from tasks.train import require_gate_passed
from test_cli import error_line, tuneflow

LABELS = ["money", "music", "sport"]


def splits_from(frame):
    return {"train": frame.iloc[:20].reset_index(drop=True), "validation": frame.iloc[20:25].reset_index(drop=True),
            "test": frame.iloc[25:].reset_index(drop=True)}


def failed(checks):
    return {check.name: check for check in checks if not check.passed and check.severity == "error"}


def test_nan_labels_and_texts_are_check_failures():
    frame = topic_frame(10).sample(frac=1, random_state=0).reset_index(drop=True)
    frame.loc[3, "label"] = None
    frame.loc[22, "text"] = float("nan")
    checks = failed(run_checks(splits_from(frame), LABELS, ValidationConfig())[0])
    assert set(checks) >= {"not_null"}
    assert {(item["split"], item["column"]) for item in checks["not_null"].evidence} == {("train", "label"), ("validation", "text")}
    assert checks["not_null"].evidence[0]["rows"] == [3]


def test_numeric_labels_mixed_with_strings_are_check_failures():
    frame = topic_frame(10).sample(frac=1, random_state=0).reset_index(drop=True).astype(object)
    frame.loc[[1, 2, 27], "label"] = [1, 2.5, 7]
    checks = failed(run_checks(splits_from(frame), LABELS, ValidationConfig())[0])
    unknown = {item["split"]: item["unknown_labels"] for item in checks["label_set"].evidence}
    assert unknown == {"train": ["1", "2.5"], "test": ["7"]}


def test_empty_split_is_a_check_failure():
    frame = topic_frame(10)
    splits = splits_from(frame) | {"test": frame.iloc[:0]}
    checks = failed(run_checks(splits, LABELS, ValidationConfig())[0])
    assert checks["min_rows_per_split"].value == 0 and checks["min_rows_per_split"].evidence[0]["split"] == "test"
    assert checks["min_rows_per_split"].reason.endswith("(smallest split: 0 rows)")


def test_wrong_columns_are_a_check_failure():
    frame = topic_frame(10).sample(frac=1, random_state=0).reset_index(drop=True)
    splits = splits_from(frame)
    splits["validation"] = splits["validation"].rename(columns={"text": "body"})
    checks = failed(run_checks(splits, LABELS, ValidationConfig())[0])
    assert checks["columns"].evidence[0]["split"] == "validation"


def run_cli_on(workdir, frame_or_bytes, **validation):
    source = workdir / "data.csv"
    if isinstance(frame_or_bytes, bytes):
        source.write_bytes(frame_or_bytes)
    else:
        frame_or_bytes.to_csv(source, index=False)
    write_params(workdir, data={"source": "data.csv"}, validation=validation)
    return tuneflow(workdir, "ingest")


def test_ten_megabyte_text_fails_the_length_check(workdir):
    frame = pd.concat([topic_frame(10), pd.DataFrame([{"text": "word " * 2_000_000, "label": "sport"}])])
    assert run_cli_on(workdir, frame).returncode == 0
    result = tuneflow(workdir, "validate")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "text_length" in error_line(result)
    report = json.loads((workdir / "artifacts" / "validation" / "report.json").read_text())
    length = next(check for check in report["checks"] if check["name"] == "text_length")
    assert length["value"] == 1 and len(length["evidence"][0]["values"][0]) <= 120  # an excerpt, not 10 MB
    assert (workdir / "artifacts" / "validation" / "report.md").stat().st_size < 50_000


def test_binary_junk_and_bad_bytes(workdir):
    junk = run_cli_on(workdir, os.urandom(4096) + b"\x00")
    assert junk.returncode == 2 and "data.csv" in error_line(junk) and "Traceback" not in junk.stderr
    latin = topic_frame(10).to_csv(index=False).encode().replace(b"number 1 ", b"caf\xe9 number 1 ")
    assert run_cli_on(workdir, latin).returncode == 0  # ingest replaces undecodable bytes and records it
    assert tuneflow(workdir, "validate").returncode == 0


def test_validate_fix_on_the_command_line(workdir):
    # one word added: another text, so another place in the split, but a near-duplicate the gate must catch
    frame = topic_frame(40)
    leaky = pd.concat([frame, frame.groupby("label").head(8).assign(text=lambda f: f["text"] + " indeed")])
    leaky.to_csv(workdir / "data.csv", index=False)
    write_params(workdir, data={"source": "data.csv", "dedup": False}, validation={"fix": False})  # fail closed
    assert tuneflow(workdir, "ingest").returncode == 0
    assert tuneflow(workdir, "validate").returncode == 3
    gate = workdir / "artifacts" / "validation"
    inputs = (gate / "report.json", gate / "data", workdir / "artifacts" / "data" / "data_card.json")
    with pytest.raises(DataGateFailed):
        require_gate_passed(*inputs)
    fixed = tuneflow(workdir, "validate", "--fix")
    assert fixed.returncode == 0, fixed.stderr
    diff = json.loads((gate / "fix_diff.json").read_text())
    assert diff["fix"] is True and diff["removed_rows"] > 0
    require_gate_passed(*inputs)  # train may run on the cleaned splits
    # new ingest data (different split): the gate's verdict is stale
    write_params(workdir, data={"source": "data.csv", "dedup": False, "split_salt": "another"}, validation={"fix": False})
    assert tuneflow(workdir, "ingest").returncode == 0
    with pytest.raises(InputError, match="not the current ingest data"):
        require_gate_passed(*inputs)
