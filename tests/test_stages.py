"""train → export → evaluate → promote on a tiny random BERT (seconds, not minutes)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import topic_frame
from pipeline.runner import run_stage
from pipeline.table import STAGES
from tasks.promote import decide
from tuneflow import artifacts as a
from tuneflow.artifacts import content_hash
from tuneflow.config import Params
from tuneflow.errors import DataGateFailed, InputError
from tuneflow.registry import Registry


def tiny_params(tiny_model, tmp_path, **train) -> Params:
    source = tmp_path / "topics.csv"
    topic_frame(30).to_csv(source, index=False)
    return Params.model_validate({
        "artifacts": str(tmp_path / "artifacts"),
        "data": {"source": str(source)},
        "model": {"base": str(tiny_model), "max_length": 32},
        # the collapse restart off: a tiny model may predict one class at epoch 1 (tests/test_collapse.py covers it)
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "collapse_restart": False, **train},
        "evaluate": {"latency_warmup": 2, "min_accuracy": 0.0, "min_macro_f1": 0.0, "min_slice_support": 1000,
                     "pytorch_reference": False},
        "promote": {"model_name": "tiny"},
    })


class Out:
    """The stage output folders of one artifacts root."""

    def __init__(self, root: Path):
        self.data, self.validation, self.model = root / a.DATA, root / a.VALIDATION, root / a.MODEL
        self.export, self.eval, self.promotion = root / a.EXPORT, root / a.EVAL, root / a.PROMOTION


def run_until(params: Params, last: str) -> Out:
    for name in STAGES:
        run_stage(STAGES[name], params)
        if name == last:
            break
    return Out(Path(params.artifacts))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_export_parity_evaluate(tiny_model, workdir, method):
    params = tiny_params(tiny_model, workdir, method=method)
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"pytorch_reference": True})})
    layout = run_until(params, "evaluate")
    summary = json.loads((layout.model / "train_summary.json").read_text())
    assert summary["method"] == method and summary["labels"] == ["money", "music", "sport"]
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    if method == "lora":
        assert summary["trainable_fraction"] < 0.2 and (layout.model / "adapter_model.safetensors").exists()
    else:
        assert summary["trainable_fraction"] == 1.0 and (layout.model / "model.safetensors").exists()
    assert summary["best_epoch"] >= 1 and summary["optimizer_steps"] > 0
    parity = json.loads((layout.export / "parity.json").read_text())
    assert parity["passed"] and parity["max_abs_logit_diff"] < 1e-3 and parity["argmax_agreement"] == 1.0
    metrics = json.loads((layout.eval / "metrics.json").read_text())
    assert len(metrics["confusion_matrix"]) == 3 and set(metrics["per_class"]) == {"money", "music", "sport"}
    # custody: the file evaluated is the file parity checked
    onnx_sha256 = content_hash(layout.export / "model.onnx")
    verdict = json.loads((layout.eval / "verdict.json").read_text())
    assert metrics["onnx_sha256"] == parity["onnx_sha256"] == verdict["onnx_sha256"] == onnx_sha256
    for name in ("accuracy", "macro_f1"):
        interval = metrics["intervals"][name]
        assert interval["low"] <= interval["value"] <= interval["high"] and interval["resamples"] == 1000
    for runtime in ("onnx", "pytorch"):  # measured apart, 1,000 batch-1 requests each
        profile = metrics["latency"][runtime]
        assert profile["samples"] == 1000 and profile["p50"] <= profile["p95"] <= profile["p99"]
        assert profile["cold_start_ms"]["total"] > 0 and profile["throughput_per_s"] > 0 and profile["by_token_length"]
    assert metrics["latency_ms"]["p95"] == metrics["latency"]["onnx"]["p95"]
    perturbed = pd.read_parquet(layout.eval / "robustness.parquet")
    test_rows = metrics["test_rows"]
    assert len(perturbed) == 7 * test_rows and set(perturbed["perturbation"]) == set(metrics["robustness"]["perturbations"])
    assert metrics["robustness"]["perturbations"]["char_delete"]["texts_changed"] > test_rows // 2
    for plot in ("confusion_matrix", "reliability", "latency"):
        assert (layout.eval / "plots" / f"{plot}.png").stat().st_size > 0
    assert {check["name"] for check in verdict["checks"]} == {
        "test_label_coverage", "accuracy", "macro_f1", "onnx_parity", "champion_non_inferiority", "beats_baseline",
        "robustness_flip_rate", "robustness_accuracy_drop", "slice_f1_gap", "calibration_ece", "latency_p95_ms", "latency_p99_ms"}
    assert all({"value", "threshold", "passed", "gating", "reason"} <= set(check) for check in verdict["checks"])
    gating = {check["name"]: check["gating"] for check in verdict["checks"]}
    assert not gating["beats_baseline"] and not gating["calibration_ece"] and gating["robustness_flip_rate"]
    champion = next(check for check in verdict["checks"] if check["name"] == "champion_non_inferiority")
    assert champion["reason"] == "first model for this name: absolute thresholds only"


def test_onnx_accepts_other_batch_and_sequence_sizes(tiny_model, workdir):
    from tuneflow.onnx_runtime import OnnxClassifier

    layout = run_until(tiny_params(tiny_model, workdir), "export")
    model = OnnxClassifier.from_export(layout.export)
    texts = ["goal", "a much longer text about the market and shares and profit " * 3] + ["album"] * 7
    assert model.logits(texts, batch_size=9).shape == (9, 3)
    # batches are formed by length; the rows still come back in the order of the texts
    one_by_one = np.concatenate([model.logits([text]) for text in texts])
    np.testing.assert_allclose(model.logits(texts, batch_size=4), one_by_one, atol=1e-5)


def test_training_refused_when_the_gate_failed(tiny_model, workdir):
    params = tiny_params(tiny_model, workdir)
    layout = run_until(params, "validate")
    report = json.loads((layout.validation / "report.json").read_text())
    report["passed"] = False
    (layout.validation / "report.json").write_text(json.dumps(report))
    with pytest.raises(DataGateFailed, match="training refused"):
        run_stage(STAGES["train"], params)
    assert not layout.model.exists()


def evaluate_and_promote(params: Params) -> dict:
    for name in ("champion", "evaluate", "promote"):
        run_stage(STAGES[name], params)
    return json.loads((Path(params.artifacts) / a.PROMOTION / "decision.json").read_text())


def versions(registry: Registry, name: str = "tiny") -> list[int]:
    return sorted(int(version.version) for version in registry.client.search_model_versions(f"name='{name}'"))


def test_promotion_rules_against_the_registry(tiny_model, workdir):
    params = tiny_params(tiny_model, workdir)
    layout = run_until(params, "promote")
    registry = Registry()
    first = json.loads((layout.promotion / "decision.json").read_text())
    assert first["promoted"] and first["alias"] == "champion" and first["previous_champion"] is None, first
    assert "first model for this name" in first["reasons"][0]
    champion = registry.by_alias("tiny", "champion")
    assert champion.version == first["version"] == "1"
    assert {"data_hash", "git_commit", "method", "base_model", "params_hash", "split", "split_salt", "verdict_summary"} <= set(champion.tags)
    assert champion.tags["data_hash"] == json.loads((layout.data / "data_card.json").read_text())["data_hash"]

    # a failing evaluation gate: registered as challenger, champion untouched
    strict = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"min_macro_f1": 1.01})})
    second = evaluate_and_promote(strict)
    assert not second["promoted"] and second["alias"] == "challenger" and "evaluation gate failed" in second["reasons"][0]
    assert registry.by_alias("tiny", "champion").version == "1"
    assert registry.by_alias("tiny", "challenger").version == "2"

    # the same model again passes: it already is the champion, so nothing is registered
    third = evaluate_and_promote(params)
    assert not third["promoted"] and third["alias"] == "champion" and third["version"] == "1"
    assert "already is champion v1; nothing registered" in third["reasons"][0]
    assert versions(registry) == [1, 2]

    # another model: evaluate scores the champion on the same test rows; the paired interval decides
    reseeded = params.model_copy(update={"train": params.train.model_copy(update={"seed": 7}),
                                         "evaluate": params.evaluate.model_copy(update={"non_inferiority_margin": 1.0})})
    for name in ("train", "export"):
        run_stage(STAGES[name], reseeded)
    fourth = evaluate_and_promote(reseeded)
    metrics = json.loads((layout.eval / "metrics.json").read_text())
    assert metrics["champion"]["paired"] and metrics["champion"]["version"] == "1"
    assert metrics["champion"]["macro_f1"] == pytest.approx(first["candidate_macro_f1"])  # v1 re-scored: what it scored
    assert fourth["promoted"] and fourth["previous_champion"] == "1" and fourth["version"] == "3"
    assert "macro-F1 minus champion v1's on the same test rows" in fourth["reasons"][0]
    assert registry.by_alias("tiny", "champion").version == "3"


def test_promote_refuses_a_verdict_about_another_file_or_champion(tiny_model, workdir):
    params = tiny_params(tiny_model, workdir)
    layout = run_until(params, "promote")
    registry = Registry()
    decision_before = (layout.promotion / "decision.json").read_text()
    # train; export; promote — the verdict on disk is about the previous export
    reseeded = params.model_copy(update={"train": params.train.model_copy(update={"seed": 7})})
    for name in ("train", "export"):
        run_stage(STAGES[name], reseeded)
    with pytest.raises(InputError, match="the verdict is about ONNX file .* run `tuneflow evaluate`"):
        run_stage(STAGES["promote"], reseeded)
    assert versions(registry) == [1] and (layout.promotion / "decision.json").read_text() == decision_before
    # an export whose file is not the one parity checked
    with (layout.export / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(InputError, match="is not the file parity.json checked"):
        run_stage(STAGES["evaluate"], reseeded)
    run_stage(STAGES["export"], reseeded)
    # the champion moved between evaluate and promote
    run_stage(STAGES["champion"], reseeded)
    run_stage(STAGES["evaluate"], reseeded)
    registry.client.delete_registered_model_alias("tiny", "champion")
    with pytest.raises(InputError, match="compared with champion v1, but @champion is none now"):
        run_stage(STAGES["promote"], reseeded)
    assert versions(registry) == [1]


def test_champion_that_cannot_be_compared_is_a_failed_check_and_never_replaced(tiny_model, workdir):
    import shutil

    params = tiny_params(tiny_model, workdir)
    run_until(params, "promote")
    registry = Registry()
    reseeded = params.model_copy(update={"train": params.train.model_copy(update={"seed": 7})})
    for name in ("train", "export"):
        run_stage(STAGES[name], reseeded)
    # the champion was tested on another split (salt): no paired comparison
    registry.client.set_model_version_tag("tiny", "1", "split", json.dumps({"method": "hash", "salt": "other"}))
    decision = evaluate_and_promote(reseeded)
    check = verdict_check(reseeded, "champion_non_inferiority")
    assert not check["passed"] and check["gating"] and "forced promotion" in check["reason"]
    assert not decision["promoted"] and registry.by_alias("tiny", "champion").version == "1"
    # the champion's artifact is gone from the registry store
    split = registry.client.get_model_version("tiny", "2").tags["split"]
    registry.client.set_model_version_tag("tiny", "1", "split", split)
    source = registry.client.get_model_version("tiny", "1").source
    run = registry.client.get_run(registry.client.get_model_version("tiny", "1").run_id)
    store = Path(run.info.artifact_uri.removeprefix("file://"))
    shutil.rmtree(store.parent / "models" if (store.parent / "models").exists() else store, ignore_errors=True)
    for folder in Path(workdir).rglob("models"):
        shutil.rmtree(folder, ignore_errors=True)
    decision = evaluate_and_promote(reseeded)
    check = verdict_check(reseeded, "champion_non_inferiority")
    assert not check["passed"] and "cannot be loaded from the registry store" in check["reason"], (check, source)
    assert not decision["promoted"] and registry.by_alias("tiny", "champion").version == "1"


def verdict_check(params: Params, name: str) -> dict:
    verdict = json.loads((Path(params.artifacts) / a.EVAL / "verdict.json").read_text())
    return next(check for check in verdict["checks"] if check["name"] == name)


def test_a_class_missing_from_test_is_an_explicit_entry_and_an_unloadable_onnx_is_refused(tiny_model, workdir):
    params = tiny_params(tiny_model, workdir)
    layout = run_until(params, "champion")
    gated = layout.validation / "data"
    test = pd.read_parquet(gated / "test.parquet")
    test[test["label"] != "music"].to_parquet(gated / "test.parquet", index=False)
    run_stage(STAGES["evaluate"], params)
    metrics = json.loads((layout.eval / "metrics.json").read_text())
    assert metrics["absent_labels"] == ["music"] and metrics["per_class"]["music"] == {
        "precision": None, "recall": None, "f1": None, "support": 0, "absent": True}
    check = verdict_check(params, "test_label_coverage")
    assert not check["passed"] and check["gating"] and "'music'" in check["reason"]
    # macro-F1 averages the two classes that have test rows, not a silent 0 for the third
    present = [metrics["per_class"][label]["f1"] for label in ("money", "sport")]
    assert metrics["macro_f1"] == pytest.approx(sum(present) / 2)
    # an ONNX file that does not load (recorded by parity, so custody holds): one line, exit 2's error type
    (layout.export / "model.onnx").write_bytes(b"not an onnx graph")
    parity = json.loads((layout.export / "parity.json").read_text())
    (layout.export / "parity.json").write_text(json.dumps(parity | {"onnx_sha256": content_hash(layout.export / "model.onnx")}))
    with pytest.raises(InputError, match="ONNX Runtime cannot load it"):
        run_stage(STAGES["evaluate"], params)


PASSED = {"passed": True, "checks": [
    {"name": "macro_f1", "passed": True, "gating": True, "reason": "ok"},
    {"name": "champion_non_inferiority", "passed": True, "gating": True, "reason": "non-inferior to v4"}]}


def test_decide_reads_only_the_verdict():
    promoted, reasons = decide(PASSED)
    assert promoted and "non-inferior to v4" in reasons[0]
    failed = {"passed": False, "checks": [
        {"name": "macro_f1", "passed": False, "gating": True, "reason": "macro_f1 0.5 < minimum 0.8"},
        {"name": "slice", "passed": False, "gating": False, "reason": "reported, not gated"},
        {"name": "champion_non_inferiority", "passed": False, "gating": True, "reason": "may be worse than the champion"}]}
    promoted, reasons = decide(failed)
    assert not promoted and "macro_f1 0.5 < minimum 0.8" in reasons[0] and "may be worse" in reasons[0]
    assert "not gated" not in reasons[0]
