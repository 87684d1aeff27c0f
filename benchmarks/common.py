"""Shared by the benchmarks: where MR lives, RESULTS.md, and test accuracy of a trained model merged the way export merges it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tuneflow.config import ModelConfig

MR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mr-polarity" / "mr.csv"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def publish(text: str) -> None:
    """Print a benchmark's section and append it to benchmarks/RESULTS.md."""
    print(text)
    with open(RESULTS, "a", encoding="utf-8") as results:
        results.write(text)


def merged_test_predictions(model_dir: Path, data_dir: Path, model_cfg: ModelConfig, summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, true) label indices on the test split of `data_dir`, from train's output in `model_dir` merged the
    way export merges it, its inputs as served (the model's `model.long_text` policy)."""
    from tuneflow.data import read_splits
    from tuneflow.methods import METHODS
    from tuneflow.models import load_classifier, load_tokenizer
    from tuneflow.trained import predict_logits, summary_long_text

    labels = summary["labels"]
    model = METHODS[summary["method"]].load_merged(model_dir, lambda **kw: load_classifier(model_cfg, labels, **kw),
                                                  summary["export_record"]).eval()
    test = read_splits(data_dir)["test"]
    truth = test["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    logits = predict_logits(model, load_tokenizer(model_cfg), test["text"].tolist(), summary_long_text(summary), 64)
    return logits.argmax(axis=-1), truth


def merged_test_accuracy(model_dir: Path, data_dir: Path, model_cfg: ModelConfig, summary: dict[str, Any]) -> tuple[float, int]:
    """(accuracy, rows) on the test split of `data_dir`, from train's output in `model_dir` and its train_summary."""
    predicted, truth = merged_test_predictions(model_dir, data_dir, model_cfg, summary)
    return float((predicted == truth).mean()), len(truth)
