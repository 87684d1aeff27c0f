"""Every method in the table: train on a tiny BERT, export to ONNX with parity, evaluate the ONNX model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import gated_params, stage_inputs, topic_frame
from tuneflow.config import ExportConfig, ModelConfig, Params, TrainConfig
from tuneflow.errors import InputError
from tuneflow.methods import METHODS

ALL_METHODS = ["full", "partial", "lora", "dora", "adalora", "ia3", "qlora", "prefix", "prompt", "p_tuning",
               "adapter_houlsby", "adapter_pfeiffer"]
WRAPPED = {"prefix", "prompt", "p_tuning", "adapter_houlsby", "adapter_pfeiffer"}


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> dict[str, Path]:
    """The train stage's inputs (gated splits, gate report, ingest card) for 3 x 20 topic rows."""
    return stage_inputs("train", gated_params(tmp_path_factory.mktemp("methods"), topic_frame(20)))


def tiny_train(**overrides) -> TrainConfig:
    return TrainConfig.model_validate({"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "lora": {"r": 4, "alpha": 8},
                                       "prompt_learning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16}, **overrides})


def test_the_table_has_every_method():
    assert sorted(METHODS) == sorted(ALL_METHODS)
    assert {name for name, method in METHODS.items() if method.export == "wrapper"} == WRAPPED


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_trains_and_exports_with_parity(tiny_model, gated, tmp_path, method):
    from tasks.export import export
    from tasks.train import train

    model_cfg = ModelConfig(base=str(tiny_model), max_length="auto")
    result = train(**gated, model_cfg=model_cfg, cfg=tiny_train(method=method), out_dir=tmp_path / "model", work_dir=tmp_path / "work")
    summary = result.summary
    assert summary["method"] == method and summary["optimizer_steps"] == summary["planned_optimizer_steps"] > 0
    assert 8 <= summary["max_length"] <= 32 and summary["max_length_source"].startswith("P99")
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    assert (summary["trainable_fraction"] == 1.0) == (method == "full")
    assert summary["weights_bytes"] > 0 and all(size > 0 for size in summary["weight_files"].values())
    assert not (tmp_path / "work" / "checkpoints" / summary["run_key"]).exists()  # pruned after success
    assert (tmp_path / "model" / "loss_curves.png").stat().st_size > 0
    assert "overfitting" in summary["diagnostics"] and summary["diagnostics"]["grad_norm"]["count"] > 0

    export_cfg = ExportConfig(parity_batch_size=8)
    parity = export(tmp_path / "model", gated["gated_data"], model_cfg, export_cfg, tmp_path / "export").parity
    assert parity["passed"], parity
    # the shipped file runs in ONNX Runtime on the test texts (the gate itself is tested in test_stages.py)
    from tuneflow.data import read_splits
    from tuneflow.onnx_runtime import OnnxClassifier

    test = read_splits(gated["gated_data"])["test"]
    assert OnnxClassifier.from_export(tmp_path / "export").logits(test["text"].tolist()).shape == (len(test), 3)
    serving = json.loads((tmp_path / "export" / "assets" / "serving.json").read_text())
    assert serving["method_export"] == ("wrapper" if method in WRAPPED else "merged")


def test_qlora_trains_on_a_4bit_base_and_never_merges_into_it(tiny_model):
    import bitsandbytes as bnb

    from tuneflow.methods import RunInfo
    from tuneflow.models import load_classifier

    cfg = ModelConfig(base=str(tiny_model))
    model = METHODS["qlora"].wrap(lambda **kw: load_classifier(cfg, ["a", "b"], **kw), tiny_train(method="qlora"), RunInfo(10, False))
    quantized = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantized and all(module.weight.quant_state.quant_type == "nf4" for module in quantized)


def test_prompt_methods_that_cannot_fit_the_positions_fail_at_train_time(tiny_model, gated, tmp_path):
    from tasks.train import train

    # the tiny model has 128 positions: 120 text tokens + 20 virtual tokens cannot be exported (or run)
    cfg = tiny_train(method="prompt", prompt_learning={"num_virtual_tokens": 20})
    with pytest.raises(InputError, match=r"train.method=prompt: .*could not be exported.*exceeds the model's 128 positions"):
        train(**gated, model_cfg=ModelConfig(base=str(tiny_model), max_length=120), cfg=cfg, out_dir=tmp_path / "model",
              work_dir=tmp_path / "work")
    assert not (tmp_path / "model").exists()


def test_gradual_unfreezing_is_only_for_full_and_partial():
    with pytest.raises(ValueError, match="gradual_unfreezing applies to methods full, partial, not 'lora'"):
        TrainConfig(method="lora", gradual_unfreezing=True)


def test_params_yaml_names_every_method_option():
    from tuneflow.config import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert isinstance(params, Params)
    train = params.train
    assert train.lora.r == 16 and train.prompt_learning.num_virtual_tokens > 0 and train.adapter.reduction_factor > 0
