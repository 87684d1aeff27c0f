"""End to end on real data with the real pre-trained model: `tuneflow run` (minutes)."""

import json
import subprocess

import pytest

from conftest import TUNEFLOW, copy_repo_files
from tuneflow.registry import Registry

pytestmark = pytest.mark.e2e


def test_tuneflow_run_promotes_a_real_model(workdir):
    copy_repo_files(workdir, "params.yaml", "pipelines.yaml")
    result = subprocess.run(
        [str(TUNEFLOW), "run", "--set", "data.sample=300", "--set", "train.epochs=2", "--set", "model.max_length=64",
         "--set", "evaluate.min_accuracy=0.5", "--set", "evaluate.min_macro_f1=0.5", "--set", "promote.model_name=e2e-bbc"],
        cwd=workdir, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    artifacts = workdir / "artifacts"
    card = json.loads((artifacts / "data" / "data_card.json").read_text())
    assert card["rows_kept"] == 300 and card["dropped"]["duplicates"] == 101
    assert json.loads((artifacts / "validation" / "report.json").read_text())["passed"]
    assert (artifacts / "model" / "adapter_model.safetensors").exists()
    gated = json.loads((artifacts / "validation" / "data" / "data_card.json").read_text())
    removed = json.loads((artifacts / "validation" / "fix_diff.json").read_text())["removed_rows"]
    assert gated["counts"]["test"] + gated["counts"]["validation"] + removed == card["counts"]["test"] + card["counts"]["validation"]
    parity = json.loads((artifacts / "export" / "parity.json").read_text())
    assert parity["passed"] and parity["texts"] == gated["counts"]["validation"]  # the gated validation split
    assert all(comparison["passed"] for comparison in parity["comparisons"].values())  # incl. vs the trained model's logits
    metrics = json.loads((artifacts / "eval" / "metrics.json").read_text())
    assert metrics["macro_f1"] > 0.5 and metrics["latency_ms"]["samples"] >= 500  # 5 classes: chance is 0.2
    decision = json.loads((artifacts / "promotion" / "decision.json").read_text())
    assert decision["promoted"] and decision["alias"] == "champion" and decision["model_name"] == "e2e-bbc"
    assert Registry().by_alias("e2e-bbc", "champion").version == decision["version"]
    for stage in ("ingest", "validate", "train", "export", "champion", "evaluate", "promote"):
        assert f"✔ {stage} done in" in result.stderr
    assert "test macro-F1" in result.stdout and "e2e-bbc v1 @champion" in result.stdout
