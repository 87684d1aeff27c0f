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


def merged_test_accuracy(model_dir: Path, data_dir: Path, model_cfg: ModelConfig, summary: dict[str, Any]) -> tuple[float, int]:
    """(accuracy, rows) on the test split of `data_dir`, from train's output in `model_dir` and its train_summary."""
    import torch

    from tuneflow.data import read_splits
    from tuneflow.methods import METHODS
    from tuneflow.models import load_classifier, load_tokenizer

    labels = summary["labels"]
    model = METHODS[summary["method"]].load_merged(model_dir, lambda **kw: load_classifier(model_cfg, labels, **kw),
                                                  summary["export_record"]).eval()
    tokenizer = load_tokenizer(model_cfg)
    test = read_splits(data_dir)["test"]
    texts, truth = test["text"].tolist(), test["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start:start + 64], truncation=True, max_length=summary["max_length"], padding=True, return_tensors="pt")
            predictions.append(model(**batch).logits.argmax(-1).numpy())
    return float((np.concatenate(predictions) == truth).mean()), len(texts)
