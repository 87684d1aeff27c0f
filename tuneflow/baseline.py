"""The baseline a fine-tuned model must beat: TF-IDF word 1–2-grams and character 1–3-grams (within word
boundaries, `char_wb`) side by side, + logistic regression (scikit-learn).

The same recipe scores every text-classification benchmark's first row; tuneflow fits it on the train split
and scores it on the test rows the model is judged on (benchmarks/pipeline_wall_time.py reports it too). Character
n-grams keep it strong where words alone are a strawman: on a non-English review set word n-grams scored macro-F1
0.58 and char_wb 1–3 0.88 (issue 13); the union holds the better of the two on BBC and MR (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import numpy as np


def fit_baseline(texts: list[str], labels: list[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    words = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    characters = TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=(1, 3), min_df=2)
    return make_pipeline(make_union(words, characters), LogisticRegression(max_iter=2000, C=10.0)).fit(texts, labels)


def baseline_probabilities(train_texts: list[str], train_labels: list[str], texts: list[str], labels: list[str]) -> np.ndarray:
    """Class probabilities for `texts`, columns in the order of `labels` (a label unseen in train gets 0)."""
    model = fit_baseline(train_texts, train_labels)
    fitted = model.predict_proba(texts)
    columns = {label: position for position, label in enumerate(model.classes_)}
    return np.stack([fitted[:, columns[label]] if label in columns else np.zeros(len(texts)) for label in labels], axis=1)
