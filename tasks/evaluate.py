"""Stage 5 — evaluate: the gate, measured on the ONNX artifact that ships.

Writes into its output folder (artifacts/eval/) metrics.json, verdict.json, report.md and plots/confusion_matrix.png.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneflow import artifacts
from tuneflow.artifacts import read_json, write_json
from tuneflow.checks import Check, at_least, at_most, gate_passed
from tuneflow.config import EvaluateConfig
from tuneflow.data import read_splits
from tuneflow.onnx_runtime import OnnxClassifier
from tuneflow.scoring import classification_metrics


@dataclass(frozen=True)
class EvaluateResult:
    eval_dir: Path
    metrics: dict[str, Any]
    verdict: dict[str, Any]


def evaluate(export_dir: Path, data_dir: Path, cfg: EvaluateConfig, out_dir: Path) -> EvaluateResult:
    test = read_splits(data_dir)["test"]
    texts, truth = test["text"].tolist(), test["label"].tolist()
    model = OnnxClassifier.from_export(export_dir, threads=cfg.threads)
    metrics = classification_metrics(model.labels, truth, model.predict(texts))
    timings = model.latency_ms(texts, cfg.latency_samples, cfg.latency_warmup)
    metrics["latency_ms"] = {
        "p50": float(np.percentile(timings, 50)),
        "p95": float(np.percentile(timings, 95)),
        "p99": float(np.percentile(timings, 99)),
        "mean": float(timings.mean()),
        "samples": int(len(timings)),
        "batch_size": 1,
        "includes": "tokenization + ONNX Runtime session.run",
    }
    metrics["test_rows"] = len(texts)
    metrics["artifact"] = artifacts.ONNX_MODEL
    parity = read_json(export_dir / artifacts.PARITY)
    checks = [
        at_least("accuracy", metrics["accuracy"], cfg.min_accuracy),
        at_least("macro_f1", metrics["macro_f1"], cfg.min_macro_f1),
        at_most("latency_p95_ms", metrics["latency_ms"]["p95"], cfg.max_latency_p95_ms),
        Check("onnx_parity", bool(parity["passed"]), parity["max_abs_logit_diff"], parity["thresholds"]["max_abs_logit_diff"],
              f"ONNX vs PyTorch max |Δlogit| {parity['max_abs_logit_diff']:.2e}, argmax agreement {parity['argmax_agreement']:.4f}"),
    ]
    verdict = {"passed": gate_passed(checks), "checks": [check.as_dict() for check in checks]}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / artifacts.METRICS, metrics)
    write_json(out_dir / artifacts.VERDICT, verdict)
    plot_confusion(metrics["confusion_matrix"], model.labels, out_dir / artifacts.CONFUSION_MATRIX)
    (out_dir / artifacts.REPORT).write_text(render_markdown(metrics, verdict), encoding="utf-8")
    return EvaluateResult(out_dir, metrics, verdict)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=labels).plot(ax=axes, colorbar=False, xticks_rotation=45)
    axes.set_title("Test confusion matrix (ONNX model)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def render_markdown(metrics: dict[str, Any], verdict: dict[str, Any]) -> str:
    latency = metrics["latency_ms"]
    lines = [
        f"# Evaluation gate: {'PASSED' if verdict['passed'] else 'FAILED'}",
        "",
        f"On the shipped ONNX model, {metrics['test_rows']} test texts.",
        "",
        "| metric | value |", "|---|---|",
        f"| accuracy | {metrics['accuracy']:.4f} |",
        f"| macro-F1 | {metrics['macro_f1']:.4f} |",
        f"| latency P50 / P95 / P99 (ms, batch 1) | {latency['p50']:.2f} / {latency['p95']:.2f} / {latency['p99']:.2f} |",
        "",
        "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
    ]
    lines += [f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |"
              for label, row in metrics["per_class"].items()]
    lines += ["", "| check | result | reason |", "|---|---|---|"]
    lines += [f"| {check['name']} | {'pass' if check['passed'] else '**FAIL**'} | {check['reason']} |" for check in verdict["checks"]]
    return "\n".join(lines) + "\n"
