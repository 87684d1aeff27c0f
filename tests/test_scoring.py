"""The evaluation gate's statistics: vectorised macro-F1, paired bootstrap intervals, calibration, the baseline."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from tuneflow.baseline import baseline_probabilities
from tuneflow.scoring import Bootstrap, accuracy_along, calibration, macro_f1_along, quality


def random_predictions(rows=400, classes=3, agreement=0.7, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, rows)
    predicted = np.where(rng.random(rows) < agreement, truth, rng.integers(0, classes, rows))
    return truth, predicted


def test_vectorised_macro_f1_is_sklearns_along_every_row():
    truth, predicted = random_predictions()
    present = np.unique(truth)
    assert macro_f1_along(truth, predicted, present) == pytest.approx(f1_score(truth, predicted, average="macro"))
    index = np.random.default_rng(1).integers(0, len(truth), (50, len(truth)))  # 50 bootstrap resamples at once
    vectorised = macro_f1_along(truth[index], predicted[index], present, axis=-1)
    one_by_one = [f1_score(truth[row], predicted[row], labels=present, average="macro", zero_division=0) for row in index]
    np.testing.assert_allclose(vectorised, one_by_one)


def test_bootstrap_interval_is_seeded_and_brackets_the_value():
    truth, predicted = random_predictions()
    interval = Bootstrap(1000, 0.95, seed=3).interval(accuracy_along, truth, predicted)
    assert interval == Bootstrap(1000, 0.95, seed=3).interval(accuracy_along, truth, predicted)
    present = np.unique(truth)
    f1 = lambda t, p, axis: macro_f1_along(t, p, present, axis)  # noqa: E731  (continuous, unlike accuracy's 1/400 steps)
    assert Bootstrap(1000, 0.95, seed=3).interval(f1, truth, predicted) != Bootstrap(1000, 0.95, seed=4).interval(f1, truth, predicted)
    assert interval["low"] < interval["value"] < interval["high"] and interval["resamples"] == 1000
    # the binomial standard error of accuracy on 400 rows: the 95 % interval is about ±1.96 of it
    p = interval["value"]
    assert interval["high"] - interval["low"] == pytest.approx(2 * 1.96 * (p * (1 - p) / 400) ** 0.5, rel=0.15)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero_and_a_worse_model_is_below_zero():
    truth, predicted = random_predictions(agreement=0.8)
    present = np.unique(truth)

    def difference(t, a, b, axis):
        return macro_f1_along(t, a, present, axis) - macro_f1_along(t, b, present, axis)

    same = Bootstrap().interval(difference, truth, predicted, predicted)
    assert same["value"] == same["low"] == same["high"] == 0.0
    _, worse = random_predictions(agreement=0.5, seed=9)
    worse = np.where(np.random.default_rng(2).random(len(truth)) < 0.5, truth, worse)
    better = Bootstrap().interval(difference, truth, predicted, worse)
    assert better["low"] > 0


def test_calibration_error_of_an_overconfident_model():
    truth = np.array([0] * 60 + [1] * 40)
    probabilities = np.tile([0.9, 0.1], (100, 1))  # always 90 % sure of class 0, right 60 % of the time
    measured = calibration(truth, probabilities, bins=10)
    assert measured["ece"] == pytest.approx(0.3)
    assert measured["reliability"] == [{"low": 0.9, "high": 1.0, "count": 100, "confidence": pytest.approx(0.9), "accuracy": 0.6}]
    honest = np.tile([0.6, 0.4], (100, 1))
    assert calibration(truth, honest, bins=10)["ece"] == pytest.approx(0.0)


def test_an_absent_class_is_reported_absent_and_left_out_of_macro_f1():
    labels = ["a", "b", "c"]
    truth = ["a"] * 30 + ["b"] * 30
    probabilities = np.array([[0.8, 0.1, 0.1]] * 25 + [[0.1, 0.1, 0.8]] * 5 + [[0.1, 0.8, 0.1]] * 30)
    measured = quality(labels, truth, probabilities, Bootstrap(), bins=10)
    assert measured["absent_labels"] == ["c"] and measured["per_class"]["c"]["f1"] is None
    assert measured["per_class"]["c"]["support"] == 0
    f1_a, f1_b = measured["per_class"]["a"]["f1"], measured["per_class"]["b"]["f1"]
    assert measured["macro_f1"] == measured["intervals"]["macro_f1"]["value"] == pytest.approx((f1_a + f1_b) / 2)  # not (f1_a + f1_b + 0) / 3
    # one-vs-rest over the present classes: a ranks 25 of 30 above every b and ties 5 (11/12); b separates fully
    assert measured["roc_auc"] == pytest.approx((11 / 12 + 1) / 2) and np.isfinite(measured["log_loss"])


def test_baseline_columns_follow_the_models_label_order():
    train_texts = ["goal match team", "match goal league", "shares market bank", "bank profit market"] * 5
    train_labels = ["sport", "sport", "money", "money"] * 5
    probabilities = baseline_probabilities(train_texts, train_labels, ["goal match", "market bank"], ["music", "money", "sport"])
    assert probabilities.shape == (2, 3) and (probabilities[:, 0] == 0).all()  # music: not in train
    assert probabilities[0].argmax() == 2 and probabilities[1].argmax() == 1


def test_the_baseline_reads_characters_where_no_word_repeats():
    """Every word occurs once, as in a highly inflected language: word n-grams (min_df 2) have nothing to learn, the
    classes differ only in their endings, which character n-grams see."""
    random = np.random.default_rng(0)
    stem = lambda: "".join(random.choice(list("bdfgklmnprst")) + random.choice(list("aeiou")) for _ in range(3))
    endings = {"a": "ung", "b": "heit"}
    texts, labels = [], []
    for index in range(240):
        label = "ab"[index % 2]
        texts.append(" ".join(stem() + endings[label] for _ in range(4)))
        labels.append(label)
    probabilities = baseline_probabilities(texts[:200], labels[:200], texts[200:], ["a", "b"])
    accuracy = (np.array(["ab"[column] for column in probabilities.argmax(axis=1)]) == np.array(labels[200:])).mean()
    assert accuracy >= 0.95, accuracy


def test_quartile_groups_cover_every_row_once_even_when_lengths_repeat():
    from tuneflow.scoring import quartile_groups

    for values in (np.arange(100), np.array([5] * 80 + list(range(20))), np.array([7] * 10)):
        groups = quartile_groups(values, "tokens")
        assert groups and sum(mask.sum() for mask in groups.values()) == len(values)
        assert np.logical_or.reduce(list(groups.values())).all()
    assert len(quartile_groups(np.arange(100), "tokens")) == 4
