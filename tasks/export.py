"""Stage 4 — export: fold the trained weights into a plain model, export ONNX (dynamo), prove parity.

Writes artifacts/export/model.onnx, assets/ (tokenizer, serving.json) and parity.json. A parity
failure raises after writing parity.json, so the run stops before evaluation and promotion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from tasks.ingest import read_splits
from tuneflow.artifacts import atomic_dir, read_json, write_json
from tuneflow.config import ExportConfig, ModelConfig
from tuneflow.errors import StageFailed
from tuneflow.methods import METHODS
from tuneflow.models import load_classifier
from tuneflow.onnx_runtime import INPUT_NAMES, OnnxClassifier


@dataclass(frozen=True)
class ExportResult:
    export_dir: Path
    parity: dict[str, Any]


def export(model_dir: Path, data_dir: Path, model_cfg: ModelConfig, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    summary = read_json(model_dir / "train_summary.json")
    labels = summary["labels"]
    base_cfg = model_cfg.model_copy(update={"base": summary["base_model"]})
    # merged weights where the method can merge; otherwise base + trained add-on, exported as one graph
    merged = METHODS[summary["method"]].load_merged(model_dir, lambda **kwargs: load_classifier(base_cfg, labels, **kwargs), summary).eval()
    logits_only = LogitsOnly(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    example = tokenizer(["a short example", "a second and somewhat longer example text"], padding=True, return_tensors="pt")
    batch, sequence = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=summary["max_length"])
    test_texts = read_splits(data_dir)["test"]["text"].tolist()

    with atomic_dir(out_dir) as staging:
        with torch.no_grad():
            program = torch.onnx.export(
                logits_only,
                (example["input_ids"], example["attention_mask"]),
                dynamo=True,
                input_names=INPUT_NAMES,
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
                opset_version=cfg.opset,
                verbose=False,
            )
        program.save(str(staging / "model.onnx"))
        assets = staging / "assets"
        tokenizer.save_pretrained(assets)
        write_json(assets / "serving.json", {"labels": labels, "max_length": summary["max_length"],
                                              "inputs": INPUT_NAMES, "output": "logits", "method": summary["method"],
                                              "method_export": summary.get("export", "merged")})
        parity = check_parity(logits_only, OnnxClassifier.from_export(staging), test_texts, cfg)
        write_json(staging / "parity.json", parity)
    if not parity["passed"]:
        raise StageFailed(
            f"{out_dir / 'parity.json'}: ONNX parity failed (max |Δlogit| {parity['max_abs_logit_diff']:.2e} "
            f"> {cfg.max_abs_logit_diff} or argmax agreement {parity['argmax_agreement']:.4f} < {cfg.min_argmax_agreement})"
        )
    return ExportResult(out_dir, parity)


def check_parity(torch_model, onnx_model: OnnxClassifier, texts: list[str], cfg: ExportConfig) -> dict[str, Any]:
    """Same inputs through PyTorch and ONNX Runtime: largest logit difference and argmax agreement."""
    worst, agree = 0.0, 0
    for start in range(0, len(texts), cfg.parity_batch_size):
        inputs = onnx_model.encode(texts[start : start + cfg.parity_batch_size])
        onnx_logits = onnx_model.session.run(["logits"], inputs)[0]
        with torch.no_grad():
            torch_logits = torch_model(*(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)).numpy()
        worst = max(worst, float(np.abs(onnx_logits - torch_logits).max()))
        agree += int((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).sum())
    agreement = agree / len(texts)
    return {
        "passed": worst <= cfg.max_abs_logit_diff and agreement >= cfg.min_argmax_agreement,
        "texts": len(texts),
        "max_abs_logit_diff": worst,
        "argmax_agreement": agreement,
        "thresholds": {"max_abs_logit_diff": cfg.max_abs_logit_diff, "min_argmax_agreement": cfg.min_argmax_agreement},
    }


class LogitsOnly(torch.nn.Module):
    """Positional tensors in, logits out: the signature the ONNX graph gets."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
