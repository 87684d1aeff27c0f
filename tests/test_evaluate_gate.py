"""The evaluation gate's parts on stand-in models (no training): robustness, slices, the champion check."""

import numpy as np
import pandas as pd

from tasks.evaluate import Scored, champion_check, robustness, slice_check, slices, worst_case
from tuneflow.config import EvaluateConfig


class KeywordModel:
    """Says `pos` exactly when the text holds the word "good" (any case): a typo in it flips the prediction."""

    labels = ["neg", "pos"]

    def logits(self, texts):
        return np.array([[0.0, 1.0] if "good" in text.lower().split() else [1.0, 0.0] for text in texts])

    @staticmethod
    def token_ids(texts):
        return [text.lower().split() for text in texts]

    @staticmethod
    def tokenizer(texts, truncation=False):
        return {"input_ids": [text.split() for text in texts]}


def scored(model, texts, truth):
    truth = np.array([model.labels.index(label) for label in truth])
    return Scored(truth, model.logits(texts).argmax(axis=-1), np.unique(truth))


def test_robustness_counts_flips_per_perturbation_and_stores_every_perturbed_text(tmp_path):
    model = KeywordModel()
    texts = [f"a really good film number {i}" for i in range(20)] + [f"a really dull film number {i}" for i in range(20)]
    truth = ["pos"] * 20 + ["neg"] * 20
    found = robustness(model, texts, scored(model, texts, truth), EvaluateConfig(perturbation_rate=1.0), tmp_path / "r.parquet")
    per = found["perturbations"]
    assert per["char_delete"]["flip_rate"] == 0.5 and per["char_delete"]["accuracy_drop"] == 0.5  # every "good" broken
    assert per["case_change"]["flip_rate"] == per["extra_whitespace"]["flip_rate"] == 0.0  # the model ignores them ...
    assert per["case_change"]["inputs_changed"] == 0 and per["case_change"]["texts_changed"] == len(texts)  # ... so never runs them
    assert found["worst_flip"]["flip_rate"] == 0.5
    stored = pd.read_parquet(tmp_path / "r.parquet")
    assert len(stored) == 7 * len(texts) and (stored.query("perturbation == 'char_delete'")["text"].tolist() != texts)
    check = worst_case("robustness_flip_rate", found["worst_flip"], "flip_rate", 0.1, "of predictions flip")
    assert not check.passed and check.gating and "50.00% of predictions flip" in check.reason
    assert worst_case("robustness_flip_rate", found["worst_flip"], "flip_rate", 0.6, "of predictions flip").passed


def test_slices_by_length_and_metadata_gate_on_the_worst_supported_slice():
    model = KeywordModel()
    short = [f"good {i}" for i in range(40)] + [f"bad {i}" for i in range(40)]
    long = [f"this is a long review that is not good at all number {i}" for i in range(40)]
    test = pd.DataFrame({"text": short + long, "label": ["pos"] * 40 + ["neg"] * 40 + ["neg"] * 40,
                         "site": ["a"] * 80 + ["b"] * 40})
    found = slices(model, test, ["site"], scored(model, test["text"], test["label"]), EvaluateConfig(min_slice_support=30))
    by_name = {row["slice"]: row for row in found["slices"]}
    assert by_name["site=a"]["accuracy"] == 1.0 and by_name["site=b"]["accuracy"] == 0.0
    assert sum(row["support"] for name, row in by_name.items() if name.startswith("tokens")) == len(test)
    assert found["worst"]["f1_gap"] == max(row["f1_gap"] for row in found["slices"] if row["gated"])
    check = slice_check(found, EvaluateConfig(max_slice_f1_gap=0.1))
    assert not check.passed and check.gating
    # a slice below min_slice_support is reported, never gated
    small = slices(model, test, ["site"], scored(model, test["text"], test["label"]), EvaluateConfig(min_slice_support=1000))
    assert small["worst"] is None and slice_check(small, EvaluateConfig()).passed


def test_champion_check_passes_on_the_lower_bound_not_the_point():
    base = {"version": "3", "paired": True, "margin": 0.02}
    noisy = base | {"macro_f1_difference": {"value": 0.01, "low": -0.03, "high": 0.05, "confidence": 0.95}}
    assert not champion_check(noisy).passed  # better on average, but could be 0.03 worse
    tight = base | {"macro_f1_difference": {"value": -0.005, "low": -0.015, "high": 0.005, "confidence": 0.95}}
    passed = champion_check(tight)
    assert passed.passed and "non-inferior" in passed.reason and "v3" in passed.reason
    unpaired = champion_check({"version": "3", "paired": False, "margin": 0.02, "reason": "another split"})
    assert not unpaired.passed and unpaired.gating and unpaired.reason == "another split"
    first = champion_check({"version": None, "paired": False, "margin": 0.02})
    assert first.passed and not first.gating
