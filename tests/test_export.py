"""Export's parity against the trained model's own validation logits, and the int8 model that ships only if it agrees."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.runner import run_stage
from pipeline.table import STAGES
from test_stages import tiny_params
from tuneflow import artifacts as a
from tuneflow.artifacts import content_hash
from tuneflow.config import ExportConfig, Params
from tuneflow.errors import InputError, StageFailed


def export_params(tiny_model: Path, folder: Path, **export) -> Params:
    # longer and faster than the other stage tests: clear logit margins, so int8 rounding flips no prediction
    params = tiny_params(tiny_model, folder, method="lora", epochs=4, learning_rate=2e-2)
    return params.model_copy(update={"export": ExportConfig(**export),
                                     "promote": params.promote.model_copy(update={"model_name": "tiny-export"})})


@pytest.fixture(scope="module")
def trained_root(tiny_model, tmp_path_factory) -> Path:
    """ingest → validate → train (LoRA) once; each test exports from its own copy."""
    folder = tmp_path_factory.mktemp("trained")
    params = export_params(tiny_model, folder)
    for name in ("ingest", "validate", "train"):
        run_stage(STAGES[name], params)
    return Path(params.artifacts)


@pytest.fixture
def trained(trained_root, tiny_model, workdir):
    """Params for a copy of the trained artifacts in this test's working directory; `trained(**export)` sets export keys."""
    shutil.copytree(trained_root, workdir / "artifacts")
    return lambda **export: export_params(tiny_model, workdir, **export)


def parity_of(params: Params) -> dict:
    return json.loads((Path(params.artifacts) / a.EXPORT / a.PARITY).read_text())


def test_train_saves_validation_logits_and_a_good_export_passes_every_comparison(trained):
    params = trained()
    root = Path(params.artifacts)
    validation = pd.read_parquet(root / a.VALIDATION / a.GATED_DATA / a.split_file("validation"))
    logits = np.load(root / a.MODEL / a.VALIDATION_LOGITS, allow_pickle=False)
    assert logits.shape == (len(validation), 3) and logits.dtype == np.float32
    summary = json.loads((root / a.MODEL / a.TRAIN_SUMMARY).read_text())
    assert summary["validation_logits"]["shape"] == [len(validation), 3]
    # the logits of the model training kept (its best epoch), not of some other state: its accuracy is the recorded one
    labels = summary["labels"]
    accuracy = float((logits.argmax(axis=-1) == validation["label"].map(labels.index).to_numpy()).mean())
    assert accuracy == pytest.approx(summary["best_validation_accuracy"], abs=1 / len(validation) + 1e-9)

    run_stage(STAGES["export"], params)
    parity = parity_of(params)
    assert parity["passed"] and parity["failed"] == [] and parity["split"] == "validation" and parity["texts"] == len(validation)
    assert set(parity["comparisons"]) == {"onnx_vs_merged", "merged_vs_trained", "onnx_vs_trained"}
    for comparison in parity["comparisons"].values():
        assert comparison["passed"] and comparison["argmax_agreement"] == 1.0 and "worst" not in comparison
    # a LoRA merge in fp32 reproduces the trained model's logits (bf16 autocast in the reference would not be this close)
    assert parity["comparisons"]["merged_vs_trained"]["max_abs_logit_diff"] < 1e-3
    assert parity["max_abs_logit_diff"] == parity["comparisons"]["onnx_vs_merged"]["max_abs_logit_diff"]
    assert parity["onnx_file"] == a.ONNX_MODEL and parity["onnx_sha256"] == content_hash(root / a.EXPORT / a.ONNX_MODEL)
    assert parity["opset"] == 18 and parity["quantization"]["requested"] == "none" and parity["quantization"]["shipped"] == "fp32"
    assert not (root / a.EXPORT / a.ONNX_INT8_MODEL).exists()


def test_a_merge_that_loses_the_trained_head_fails_export_and_evaluate_refuses_it(trained, monkeypatch):
    import torch

    from tuneflow.methods import METHODS

    merge = METHODS["lora"].load_merged

    def merge_without_the_head(model_dir, load_base, record):
        model = merge(model_dir, load_base, record)
        torch.manual_seed(0)
        model.classifier.reset_parameters()  # as if the merge had not restored the trained classification head
        return model

    monkeypatch.setitem(METHODS, "lora", dataclasses.replace(METHODS["lora"], load_merged=merge_without_the_head))
    params = trained()
    with pytest.raises(StageFailed, match=r"parity.json: parity failed: merged PyTorch model vs the trained model: max \|Δlogit\|"):
        run_stage(STAGES["export"], params)
    parity = parity_of(params)
    # ONNX faithfully reproduces the broken merge; only the comparisons with the trained model catch it
    assert not parity["passed"] and parity["failed"] == ["merged_vs_trained", "onnx_vs_trained"]
    assert parity["comparisons"]["onnx_vs_merged"]["passed"]
    broken = parity["comparisons"]["merged_vs_trained"]
    assert broken["max_abs_logit_diff"] > params.export.trained_max_abs_logit_diff
    texts = pd.read_parquet(Path(params.artifacts) / a.VALIDATION / a.GATED_DATA / a.split_file("validation"))["text"].tolist()
    assert 1 <= len(broken["worst"]) <= 5
    for example in broken["worst"]:
        assert example["text"] == texts[example["index"]][:200] and len(example["logits"]) == len(example["reference_logits"]) == 3
        assert example["max_abs_logit_diff"] == pytest.approx(
            float(np.abs(np.array(example["logits"]) - np.array(example["reference_logits"])).max()), rel=1e-5)
    assert max(example["max_abs_logit_diff"] for example in broken["worst"]) == pytest.approx(broken["max_abs_logit_diff"])
    report = (Path(params.artifacts) / a.EXPORT / a.REPORT).read_text()
    assert "FAILED parity" in report and "Worst rows, merged PyTorch model vs the trained model" in report

    run_stage(STAGES["champion"], params)
    with pytest.raises(InputError, match=r"export/parity.json: the export failed parity \(merged_vs_trained, onnx_vs_trained\)"):
        run_stage(STAGES["evaluate"], params)
    assert not (Path(params.artifacts) / a.EVAL).exists()


def test_a_model_without_its_validation_logits_or_with_other_validation_texts_must_be_retrained(trained):
    params = trained()
    root = Path(params.artifacts)
    gated_validation = root / a.VALIDATION / a.GATED_DATA / a.split_file("validation")
    frame = pd.read_parquet(gated_validation)
    frame.iloc[1:].to_parquet(gated_validation, index=False)
    with pytest.raises(InputError, match=r"validation_logits.npy: computed on other validation texts .* re-run `tuneflow train`"):
        run_stage(STAGES["export"], params)
    frame.to_parquet(gated_validation, index=False)
    (root / a.MODEL / a.VALIDATION_LOGITS).unlink()
    with pytest.raises(InputError, match=r"validation_logits.npy: missing .* re-run `tuneflow train`"):
        run_stage(STAGES["export"], params)
    assert not (root / a.EXPORT).exists()


def test_dynamic_int8_ships_when_it_agrees_with_fp32(trained):
    params = trained(quantize="dynamic")
    root = Path(params.artifacts)
    run_stage(STAGES["export"], params)
    parity = parity_of(params)
    quantization = parity["quantization"]
    int8 = root / a.EXPORT / a.ONNX_INT8_MODEL
    assert parity["passed"] and quantization["requested"] == "dynamic" and quantization["shipped"] == "int8", quantization
    assert quantization["argmax_agreement"] >= 0.99 and quantization["accuracy_drop"] <= 0.005
    assert quantization["reason"].startswith("int8 ships")
    assert quantization["size_bytes"] == {"fp32": (root / a.EXPORT / a.ONNX_MODEL).stat().st_size, "int8": int8.stat().st_size}
    assert quantization["size_bytes"]["int8"] < quantization["size_bytes"]["fp32"]
    assert parity["onnx_file"] == a.ONNX_INT8_MODEL and parity["onnx_sha256"] == content_hash(int8)
    assert content_hash(int8) != content_hash(root / a.EXPORT / a.ONNX_MODEL)
    assert quantization["reason"] in (root / a.EXPORT / a.REPORT).read_text()
    # quantised on top of the fused graph: the fused attention became its int8 twin
    assert parity["optimization"]["applied"] and "QAttention" in op_types(int8)


def op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def test_the_transformer_optimisation_ships_the_fused_graph_once_it_passes_parity(trained):
    params = trained()  # export.optimize: transformer, the default
    root = Path(params.artifacts)
    run_stage(STAGES["export"], params)
    parity = parity_of(params)
    optimization = parity["optimization"]
    assert parity["passed"] and optimization["applied"] and optimization["exporter"] == "torchscript", optimization
    # every layer of the tiny 2-layer BERT fused; Add + LayerNormalization kept apart (onnx_runtime.UNFUSED)
    assert optimization["fused"]["Attention"] == 2 and optimization["fused"]["EmbedLayerNormalization"] == 1
    shipped = root / a.EXPORT / a.ONNX_MODEL
    assert parity["onnx_file"] == a.ONNX_MODEL and parity["onnx_sha256"] == content_hash(shipped)
    assert {"Attention", "EmbedLayerNormalization", "BiasGelu"} <= op_types(shipped)
    assert "SkipLayerNormalization" not in op_types(shipped)
    assert not (root / a.EXPORT / "model.torchscript.onnx").exists()
    assert optimization["reason"] in (root / a.EXPORT / a.REPORT).read_text()
    # the fused graph is what parity measured: the same answers as the trained model
    assert parity["comparisons"]["onnx_vs_trained"]["argmax_agreement"] == 1.0

    params = trained(optimize="none")
    run_stage(STAGES["export"], params)
    parity = parity_of(params)
    assert parity["optimization"] == {"requested": "none", "applied": False, "reason": "export.optimize is none", "exporter": "dynamo"}
    assert "Attention" not in op_types(shipped) and parity["onnx_sha256"] == content_hash(shipped)


def test_a_fused_graph_that_fails_parity_does_not_ship(trained, monkeypatch):
    import torch

    from tasks import export as export_stage

    class Flipped(torch.nn.Module):  # a fusion gone wrong: the same graph shape, other answers
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return -self.model(input_ids, attention_mask)

    trace = export_stage.export_torchscript
    monkeypatch.setattr(export_stage, "export_torchscript", lambda model, *args: trace(Flipped(model).eval(), *args))
    params = trained()
    root = Path(params.artifacts)
    run_stage(STAGES["export"], params)
    parity = parity_of(params)
    optimization = parity["optimization"]
    assert parity["passed"] and not optimization["applied"] and optimization["exporter"] == "dynamo"
    assert optimization["fused"]["Attention"] == 2
    assert optimization["reason"].startswith("the fused graph failed parity (fused ONNX vs the merged PyTorch model: max |Δlogit|")
    assert optimization["reason"].endswith("the unfused dynamo export ships")
    assert "Attention" not in op_types(root / a.EXPORT / a.ONNX_MODEL)


def test_the_optimisation_is_a_recorded_no_op_for_a_model_type_it_cannot_fuse(tiny_model, tmp_path):
    from transformers import AutoTokenizer, MPNetConfig, MPNetForSequenceClassification

    from tasks.export import fuse_transformer
    from tuneflow.trained import LogitsOnly

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    mpnet = MPNetForSequenceClassification(MPNetConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    path = tmp_path / a.ONNX_MODEL
    record = fuse_transformer(LogitsOnly(mpnet), tokenizer, ExportConfig(), path)
    assert not record["applied"] and record["model_type"] == "mpnet" and "Attention" not in record["fused"]
    assert record["reason"] == ("ONNX Runtime's transformer optimizer fused 0 Attention nodes for the 2 layers of this mpnet "
                                "model; the unfused dynamo export ships")
    assert not path.exists() and not (tmp_path / "model.torchscript.onnx").exists()


@pytest.mark.slow
def test_evaluate_judges_and_profiles_the_shipped_int8_file(trained):
    params = trained(quantize="dynamic")
    root = Path(params.artifacts)
    int8 = root / a.EXPORT / a.ONNX_INT8_MODEL
    run_stage(STAGES["export"], params)
    assert parity_of(params)["onnx_file"] == a.ONNX_INT8_MODEL
    run_stage(STAGES["champion"], params)
    run_stage(STAGES["evaluate"], params)
    metrics = json.loads((root / a.EVAL / a.METRICS).read_text())
    verdict = json.loads((root / a.EVAL / a.VERDICT).read_text())
    assert metrics["onnx_file"] == verdict["onnx_file"] == a.ONNX_INT8_MODEL
    assert metrics["onnx_sha256"] == verdict["onnx_sha256"] == content_hash(int8)
    assert metrics["latency"]["onnx"]["size_bytes"] == int8.stat().st_size
    # the fp32 file could ship too: it is profiled beside the shipped one
    assert metrics["latency"]["onnx_fp32"]["size_bytes"] == (root / a.EXPORT / a.ONNX_MODEL).stat().st_size
    assert "ONNX Runtime fp32 (not shipped)" in (root / a.EVAL / a.REPORT).read_text()


def quantizer_that_flips_predictions(model_input, model_output, **options):
    """Stands in for quantize_dynamic: its "int8" model negates the logits, so every prediction changes."""
    import onnx
    from onnx import helper

    graph = model_input.graph
    logits = graph.output[0].name
    for node in graph.node:
        if logits in node.output:
            outputs = [f"{name}_unflipped" if name == logits else name for name in node.output]
            del node.output[:]
            node.output.extend(outputs)
    graph.node.append(helper.make_node("Neg", [f"{logits}_unflipped"], [logits]))
    onnx.save(model_input, str(model_output))


@pytest.mark.parametrize("thresholds, refusal", [
    ({"int8_max_accuracy_drop": 1.0}, "argmax agreement with fp32 0.0000 < export.int8_min_argmax_agreement 0.99"),
    ({"int8_min_argmax_agreement": 0.0}, "validation accuracy drop 0.2222 (0.5556 → 0.3333) > export.int8_max_accuracy_drop 0.005"),
])
def test_an_int8_model_that_fails_either_check_is_rejected_and_fp32_ships(trained, monkeypatch, thresholds, refusal):
    monkeypatch.setattr("onnxruntime.quantization.quantize_dynamic", quantizer_that_flips_predictions)
    params = trained(quantize="dynamic", **thresholds)
    root = Path(params.artifacts)
    run_stage(STAGES["export"], params)
    parity = parity_of(params)
    quantization = parity["quantization"]
    assert parity["passed"] and quantization["shipped"] == "fp32" and quantization["argmax_agreement"] == 0.0
    assert quantization["reason"] == f"int8 rejected, fp32 ships: {refusal}"
    assert parity["onnx_file"] == a.ONNX_MODEL and parity["onnx_sha256"] == content_hash(root / a.EXPORT / a.ONNX_MODEL)
    assert not (root / a.EXPORT / a.ONNX_INT8_MODEL).exists()  # only files that may ship stay in the export
    assert refusal in (root / a.EXPORT / a.REPORT).read_text()


def test_optimize_takes_none_or_transformer():
    assert ExportConfig().optimize == "transformer"
    with pytest.raises(ValueError, match="'none' or 'transformer'"):
        ExportConfig(optimize="fast")


def test_quantize_takes_none_or_dynamic():
    assert ExportConfig().quantize == "none"
    assert ExportConfig(quantize="dynamic").quantize == "dynamic"
    with pytest.raises(ValueError, match="'none' or 'dynamic'"):
        ExportConfig(quantize="int4")


def test_worst_rows_quote_at_most_200_characters_of_a_text():
    from tasks.export import shorten

    assert shorten("short text") == "short text"
    assert shorten("x" * 500) == "x" * 200 + "…"
