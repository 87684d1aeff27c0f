"""Classification metrics from labels or from a model's probabilities, with seeded bootstrap confidence intervals.

The intervals come from `scipy.stats.bootstrap` (paired resampling of test rows, percentile method), with the
statistics vectorised over the resamples. Macro-F1 averages the classes that have test rows: a class without
any is reported as absent, never scored 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


def classification_metrics(labels: list[str], truth: list[str], predicted: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(truth, predicted, labels=labels).tolist(),
    }


@dataclass(frozen=True)
class Bootstrap:
    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def interval(self, statistic: Callable[..., np.ndarray], *samples: np.ndarray) -> dict[str, float]:
        """Point value and interval of `statistic(*samples, axis=-1)`, resampling rows jointly (paired)."""
        from scipy.stats import bootstrap

        point = float(statistic(*samples, axis=-1))
        result = bootstrap(samples, statistic, paired=True, vectorized=True, n_resamples=self.resamples,
                           confidence_level=self.confidence, method="percentile", rng=np.random.default_rng(self.seed))
        low, high = result.confidence_interval
        return {"value": point, "low": float(low), "high": float(high), "confidence": self.confidence,
                "resamples": self.resamples, "method": "paired bootstrap, percentile"}


def accuracy_along(truth: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    return (truth == predicted).mean(axis=axis)


def macro_f1_along(truth: np.ndarray, predicted: np.ndarray, classes: np.ndarray, axis: int = -1) -> np.ndarray:
    """Macro-F1 over `classes` (label indices), computed along `axis`: one value per bootstrap resample."""
    scores = []
    for label in classes:
        is_true, is_predicted = truth == label, predicted == label
        true_positive = (is_true & is_predicted).sum(axis=axis)
        denominator = is_true.sum(axis=axis) + is_predicted.sum(axis=axis)
        scores.append(np.divide(2 * true_positive, denominator, out=np.zeros(np.shape(true_positive)), where=denominator > 0))
    return np.mean(scores, axis=0)


def softmax(logits: np.ndarray) -> np.ndarray:
    from scipy.special import softmax as scipy_softmax

    return scipy_softmax(logits.astype(np.float64), axis=-1)


def quality(labels: list[str], truth: list[str], probabilities: np.ndarray, bootstrap: Bootstrap, bins: int) -> dict[str, Any]:
    """Accuracy and macro-F1 (point values, and `intervals`), per-class scores, ROC-AUC, log loss and calibration."""
    from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support, roc_auc_score

    index = {label: position for position, label in enumerate(labels)}
    true_index = np.array([index[label] for label in truth])
    predicted_index = probabilities.argmax(axis=-1)
    present = np.unique(true_index)
    absent = [labels[position] for position in range(len(labels)) if position not in set(present.tolist())]
    precision, recall, f1, support = precision_recall_fscore_support(true_index, predicted_index, labels=range(len(labels)), zero_division=0)
    per_class = {
        label: ({"precision": float(precision[position]), "recall": float(recall[position]), "f1": float(f1[position]),
                 "support": int(support[position])} if label not in absent else
                {"precision": None, "recall": None, "f1": None, "support": 0, "absent": True})
        for position, label in enumerate(labels)
    }
    if len(labels) == 2:
        roc_auc = (float(roc_auc_score(true_index == 1, probabilities[:, 1])) if not absent else None)
    else:  # one-vs-rest, macro over the classes with test rows
        roc_auc = float(np.mean([roc_auc_score(true_index == label, probabilities[:, label]) for label in present])) if len(present) > 1 else None
    intervals = {"accuracy": bootstrap.interval(accuracy_along, true_index, predicted_index),
                 "macro_f1": bootstrap.interval(lambda t, p, axis: macro_f1_along(t, p, present, axis), true_index, predicted_index)}
    return {
        "accuracy": intervals["accuracy"]["value"],
        "macro_f1": intervals["macro_f1"]["value"],
        "intervals": intervals,
        "per_class": per_class,
        "absent_labels": absent,
        "roc_auc": roc_auc,
        "roc_auc_average": "binary" if len(labels) == 2 else "one-vs-rest macro",
        "log_loss": float(log_loss(true_index, np.clip(probabilities, 1e-15, 1), labels=range(len(labels)))),
        "calibration": calibration(true_index, probabilities, bins),
        "confusion_matrix": confusion_matrix(true_index, predicted_index, labels=range(len(labels))).tolist(),
    }


def calibration(true_index: np.ndarray, probabilities: np.ndarray, bins: int) -> dict[str, Any]:
    """Expected calibration error of the top-label confidence over equal-width bins, and the reliability table."""
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == true_index
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    table = []
    for position in range(bins):
        members = which == position
        if members.any():
            table.append({"low": position / bins, "high": (position + 1) / bins, "count": int(members.sum()),
                          "confidence": float(confidence[members].mean()), "accuracy": float(correct[members].mean())})
    ece = sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / len(true_index)
    return {"ece": float(ece), "bins": bins, "reliability": table}


def quartile_groups(values: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """Row masks per quartile of `values` (fewer groups where many values repeat; one when all are equal)."""
    import pandas as pd

    values = np.asarray(values)
    if len(np.unique(values)) < 2:
        return {f"{name} {int(values[0])}": np.ones(len(values), dtype=bool)} if len(values) else {}
    quartile = pd.qcut(pd.Series(values), 4, duplicates="drop")
    return {f"{name} {interval}": (quartile == interval).to_numpy() for interval in quartile.cat.categories}
