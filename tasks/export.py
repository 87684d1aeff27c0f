"""Stage 4 — export: fold the trained weights into a plain model, export ONNX (dynamo), prove parity.

Writes into its output folder (artifacts/export/) model.onnx, assets/ (tokenizer, serving.json), parity.json
and report.md. A parity failure is raised once they are published, so the run stops before evaluation and
promotion with the evidence kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from tuneflow import artifacts
from tuneflow.artifacts import content_hash, write_json
from tuneflow.config import ExportConfig, ModelConfig
from tuneflow.data import read_splits
from tuneflow.errors import StageFailed
from tuneflow.onnx_runtime import INPUT_NAMES, OnnxClassifier
from tuneflow.trained import LogitsOnly, load_trained


@dataclass(frozen=True)
class ExportResult:
    export_dir: Path
    parity: dict[str, Any]

    def failure(self, published: Path) -> StageFailed | None:
        """Raised by the stage runner once the export and its parity record are published in `published`."""
        if self.parity["passed"]:
            return None
        thresholds = self.parity["thresholds"]
        return StageFailed(
            f"{published / artifacts.PARITY}: ONNX parity failed (max |Δlogit| {self.parity['max_abs_logit_diff']:.2e} "
            f"> {thresholds['max_abs_logit_diff']} or argmax agreement {self.parity['argmax_agreement']:.4f} "
            f"< {thresholds['min_argmax_agreement']})")


def export(model_dir: Path, data_dir: Path, model_cfg: ModelConfig, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    # merged weights where the method can merge; otherwise base + trained add-on, exported as one graph
    merged, summary = load_trained(model_dir, model_cfg)
    labels = summary["labels"]
    logits_only = LogitsOnly(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    example = tokenizer(["a short example", "a second and somewhat longer example text"], padding=True, return_tensors="pt")
    batch, sequence = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=summary["max_length"])
    test_texts = read_splits(data_dir)["test"]["text"].tolist()

    out_dir.mkdir(parents=True, exist_ok=True)
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
    program.save(str(out_dir / artifacts.ONNX_MODEL))
    assets = out_dir / artifacts.ASSETS
    tokenizer.save_pretrained(assets)
    write_json(assets / artifacts.SERVING, {"labels": labels, "max_length": summary["max_length"],
                                            "inputs": INPUT_NAMES, "output": "logits", "method": summary["method"],
                                            "method_export": summary["export"]})
    parity = check_parity(logits_only, OnnxClassifier.from_export(out_dir), test_texts, cfg)
    parity.update(onnx_file=artifacts.ONNX_MODEL, onnx_sha256=content_hash(out_dir / artifacts.ONNX_MODEL))
    write_json(out_dir / artifacts.PARITY, parity)
    (out_dir / artifacts.REPORT).write_text(render_report(summary, parity), encoding="utf-8")
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


def render_report(summary: dict[str, Any], parity: dict[str, Any]) -> str:
    thresholds = parity["thresholds"]
    return "\n".join([
        f"# Export: {'PASSED' if parity['passed'] else 'FAILED'} ONNX parity",
        "",
        f"`{artifacts.ONNX_MODEL}` from {summary['method']} on {summary['base_model']} ({summary['export']} export, "
        f"dynamic batch and sequence up to {summary['max_length']} tokens).",
        "",
        "| check | value | threshold |", "|---|---|---|",
        f"| max abs logit difference, ONNX Runtime vs PyTorch | {parity['max_abs_logit_diff']:.2e} | ≤ {thresholds['max_abs_logit_diff']} |",
        f"| argmax agreement on {parity['texts']} test texts | {parity['argmax_agreement']:.4f} | ≥ {thresholds['min_argmax_agreement']} |",
    ]) + "\n"
