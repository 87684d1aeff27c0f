"""Every method in the table: train on a tiny BERT, export to ONNX with parity, evaluate the ONNX model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import gated_params, stage_inputs, topic_frame
from tuneflow.config import ExportConfig, ModelConfig, TrainConfig
from tuneflow.errors import InputError
from tuneflow.methods import METHODS
from tuneflow.schema import Section

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


def test_qlora_export_merges_into_dequantised_dense_weights_never_into_4bit(tiny_model, tmp_path):
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneflow import artifacts
    from tuneflow.methods import RunInfo
    from tuneflow.models import load_classifier
    from tuneflow.trained import load_trained

    cfg, model_cfg, labels = tiny_train(method="qlora"), ModelConfig(base=str(tiny_model)), ["a", "b", "c"]
    trained = METHODS["qlora"].wrap(lambda **kw: load_classifier(model_cfg, labels, **kw), cfg, RunInfo(10, False))
    quantized = [module for module in trained.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantized and all(module.weight.quant_state.quant_type == "nf4" for module in quantized)

    # stand-in for training: PEFT starts lora_B at zero, which would make every merge look right
    torch.manual_seed(1)
    expected, deltas, from_4bit = {}, {}, set()
    for name, module in trained.named_modules():
        if isinstance(module, LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
            base, key = module.base_layer, name.removeprefix("base_model.model.") + ".weight"
            if isinstance(base, bnb.nn.Linear4bit):
                from_4bit.add(key)
                dense = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
            else:  # the pooler: kept out of quantisation
                dense = base.weight
            expected[key], deltas[key] = (dense + delta).detach(), delta.detach()
    assert from_4bit
    trained.save_pretrained(tmp_path)  # what the Trainer saves for a PEFT model
    artifacts.write_json(tmp_path / artifacts.TRAIN_SUMMARY, {"method": "qlora", "base_model": str(tiny_model), "labels": labels,
                                                             "export_record": METHODS["qlora"].export_record(cfg)})

    merged, _ = load_trained(tmp_path, model_cfg)  # what export turns into ONNX
    assert not [module for module in merged.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert not [name for name, p in merged.named_parameters() if isinstance(p, bnb.nn.Params4bit) or p.dtype != torch.float32]
    weights = {name: parameter.detach() for name, parameter in merged.named_parameters()}
    original = dict(AutoModelForSequenceClassification.from_pretrained(tiny_model).named_parameters())
    for key, weight in expected.items():
        assert torch.allclose(weights[key], weight, atol=1e-6), key  # de-quantised base + the LoRA delta
    # ... not the original fp32 base + delta: the base is the 4-bit one that was trained, its rounding (~1e-2) included
    assert all(float((weights[key] - original[key] - deltas[key]).abs().max()) > 1e-3 for key in from_4bit)
    tokens = AutoTokenizer.from_pretrained(tiny_model)(["goal match team", "album band song tour"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**tokens).logits, trained.eval()(**tokens).logits, atol=1e-4)


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


def method_options() -> dict[str, Any]:
    """Every option a method reads, as params.yaml would spell it: `train.<key>`, and each key of an options section."""
    def keys(field) -> Any:
        section = field.annotation
        if isinstance(section, type) and issubclass(section, Section):
            return {name: keys(child) for name, child in section.model_fields.items()}
        return None

    fields = TrainConfig.model_fields
    named = {option for method in METHODS.values() for option in method.options}
    sections = {name for name, field in fields.items() if keys(field) is not None}
    return {name: keys(fields[name]) for name in sorted(named | sections)}


def missing(expected: dict[str, Any], tree: Any, prefix: str) -> list[str]:
    """The keys of `expected` (recursively) that `tree` does not spell out."""
    gaps = []
    for key, children in expected.items():
        if not isinstance(tree, dict) or key not in tree:
            gaps.append(f"{prefix}.{key}")
        elif children is not None:
            gaps += missing(children, tree[key], f"{prefix}.{key}")
    return gaps


def leaves(expected: dict[str, Any]) -> list[tuple[str, ...]]:
    return [path for key, children in expected.items()
            for path in ([(key,)] if children is None else [(key, *rest) for rest in leaves(children)])]


def test_params_yaml_names_every_method_option():
    options = method_options()
    assert {"unfreeze_layers", "lora", "adalora", "qlora", "ia3", "prompt_learning", "adapter"} <= set(options)
    written = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text(encoding="utf-8"))
    assert missing(options, written["train"], "train") == []
    # the check sees each one go: drop any single option or section from a copy and it is named
    for path in leaves(options) + [(name,) for name, children in options.items() if children is not None]:
        trimmed = copy.deepcopy(written["train"])
        node = trimmed
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        assert missing(options, trimmed, "train") == ["train." + ".".join(path)]
