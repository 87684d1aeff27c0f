"""train → export → evaluate → promote on a tiny random BERT (seconds, not minutes)."""

import json
from pathlib import Path

import pytest

from conftest import topic_frame
from pipeline.runner import run_stage
from pipeline.table import STAGES
from tasks.promote import ChampionScore, decide
from tuneflow import artifacts as a
from tuneflow.config import Params
from tuneflow.errors import DataGateFailed
from tuneflow.registry import Registry


def tiny_params(tiny_model, tmp_path, **train) -> Params:
    source = tmp_path / "topics.csv"
    topic_frame(30).to_csv(source, index=False)
    return Params.model_validate({
        "artifacts": str(tmp_path / "artifacts"),
        "data": {"source": str(source)},
        "model": {"base": str(tiny_model), "max_length": 32},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, **train},
        "evaluate": {"latency_samples": 20, "latency_warmup": 2, "min_accuracy": 0.0, "min_macro_f1": 0.0},
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
    assert set(metrics["latency_ms"]) >= {"p50", "p95", "p99"} and metrics["latency_ms"]["samples"] == 20
    assert len(metrics["confusion_matrix"]) == 3 and set(metrics["per_class"]) == {"money", "music", "sport"}
    assert (layout.eval / "plots" / "confusion_matrix.png").stat().st_size > 0
    verdict = json.loads((layout.eval / "verdict.json").read_text())
    assert {check["name"] for check in verdict["checks"]} == {"accuracy", "macro_f1", "latency_p95_ms", "onnx_parity"}
    assert all(check["reason"] for check in verdict["checks"])


def test_onnx_accepts_other_batch_and_sequence_sizes(tiny_model, workdir):
    from tuneflow.onnx_runtime import OnnxClassifier

    layout = run_until(tiny_params(tiny_model, workdir), "export")
    model = OnnxClassifier.from_export(layout.export)
    texts = ["goal", "a much longer text about the market and shares and profit " * 3] + ["album"] * 7
    assert model.logits(texts, batch_size=9).shape == (9, 3)


def test_training_refused_when_the_gate_failed(tiny_model, workdir):
    params = tiny_params(tiny_model, workdir)
    layout = run_until(params, "validate")
    report = json.loads((layout.validation / "report.json").read_text())
    report["passed"] = False
    (layout.validation / "report.json").write_text(json.dumps(report))
    with pytest.raises(DataGateFailed, match="training refused"):
        run_stage(STAGES["train"], params)
    assert not layout.model.exists()


def test_promotion_rules_against_the_registry(tiny_model, workdir):
    params = tiny_params(tiny_model, workdir)
    layout = run_until(params, "promote")
    registry = Registry()
    first = json.loads((layout.promotion / "decision.json").read_text())
    assert first["promoted"] and first["alias"] == "champion" and first["previous_champion"] is None
    champion = registry.by_alias("tiny", "champion")
    assert champion.version == first["version"] == "1"
    assert {"data_hash", "git_commit", "method", "base_model", "params_hash"} <= set(champion.tags)
    assert champion.tags["data_hash"] == json.loads((layout.data / "data_card.json").read_text())["data_hash"]

    # a failing evaluation gate: registered as challenger, champion untouched
    strict = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"min_macro_f1": 1.01})})
    run_stage(STAGES["evaluate"], strict)
    run_stage(STAGES["promote"], strict)
    second = json.loads((layout.promotion / "decision.json").read_text())
    assert not second["promoted"] and second["alias"] == "challenger" and "evaluation gate failed" in second["reasons"][0]
    assert registry.by_alias("tiny", "champion").version == "1"
    assert registry.by_alias("tiny", "challenger").version == "2"

    # the same model again passes: it already is the champion, so nothing is registered
    run_stage(STAGES["evaluate"], params)
    run_stage(STAGES["promote"], params)
    third = json.loads((layout.promotion / "decision.json").read_text())
    assert not third["promoted"] and third["alias"] == "champion" and third["version"] == "1"
    assert "already is champion v1; nothing registered" in third["reasons"][0]
    assert sorted(int(version.version) for version in registry.client.search_model_versions("name='tiny'")) == [1, 2]

    # another model: the champion is downloaded and re-scored on this run's test split, where it scores what it did
    reseeded = params.model_copy(update={"train": params.train.model_copy(update={"seed": 7}),
                                         "promote": params.promote.model_copy(update={"max_f1_drop": 1.0})})
    for name in ("train", "export", "evaluate", "promote"):
        run_stage(STAGES[name], reseeded)
    fourth = json.loads((layout.promotion / "decision.json").read_text())
    assert fourth["promoted"] and fourth["previous_champion"] == "1" and fourth["version"] == "3"
    assert fourth["champion_macro_f1"] == pytest.approx(first["candidate_macro_f1"])
    assert registry.by_alias("tiny", "champion").version == "3"


PASSED = {"passed": True, "checks": [{"name": "macro_f1", "passed": True, "gating": True, "reason": "ok"}]}


def test_decide_is_non_inferiority_with_a_margin():
    assert decide(PASSED, 0.90, None, 0.01)[0]
    assert decide(PASSED, 0.90, ChampionScore("4", 0.905, ""), 0.01)[0]
    promoted, reasons = decide(PASSED, 0.88, ChampionScore("4", 0.905, ""), 0.01)
    assert not promoted and "worse than champion" in reasons[0] and "v4" in reasons[0]
    failed = {"passed": False, "checks": [{"name": "macro_f1", "passed": False, "gating": True, "reason": "macro_f1 0.5 < minimum 0.8"},
                                          {"name": "slice", "passed": False, "gating": False, "reason": "reported, not gated"}]}
    promoted, reasons = decide(failed, 0.99, None, 0.01)
    assert not promoted and "macro_f1 0.5 < minimum 0.8" in reasons[0] and "not gated" not in reasons[0]
    promoted, reasons = decide(PASSED, 0.99, ChampionScore("2", None, "its label set differs"), 0.01)
    assert not promoted and "label set differs" in reasons[0]
