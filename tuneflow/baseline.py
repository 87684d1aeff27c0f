"""The baseline a fine-tuned model must beat: TF-IDF word 1–2-grams + logistic regression (scikit-learn).

The same recipe scores every text-classification benchmark's first row; tuneflow fits it on the train split
and scores it on the test rows the model is judged on (benchmarks/pipeline_wall_time.py reports it too).
"""

from __future__ import annotations

import numpy as np


def fit_baseline(texts: list[str], labels: list[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2),
                         LogisticRegression(max_iter=2000, C=10.0)).fit(texts, labels)


def baseline_probabilities(train_texts: list[str], train_labels: list[str], texts: list[str], labels: list[str]) -> np.ndarray:
    """Class probabilities for `texts`, columns in the order of `labels` (a label unseen in train gets 0)."""
    model = fit_baseline(train_texts, train_labels)
    fitted = model.predict_proba(texts)
    columns = {label: position for position, label in enumerate(model.classes_)}
    return np.stack([fitted[:, columns[label]] if label in columns else np.zeros(len(texts)) for label in labels], axis=1)
