"""No collapse by default (issue 13): the restart (a new seed, an epoch more) when the kept validation macro-F1 is
within the margin of answering the majority class for every text, and class_weights auto. Proved by effect on tiny config-built models: an absurd learning rate collapses them, a
near-zero one leaves the base model's own (spread) predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import gated_params, stage_inputs, topic_frame
from tuneflow.config import ModelConfig, TrainConfig

ABSURD = 1e3  # LoRA at this learning rate blows the weights up: every validation text gets one class
STILL = 1e-12  # the weights do not move: the base model's predictions


def classifier_model(tiny_model, folder: Path, fitted: bool) -> Path:
    """The tiny BERT with its classifier set so that its untrained predictions differ from text to text (the plain tiny
    model answers one class for everything, which the diagnosis would rightly call a collapse): scaled-up random weights
    (several classes, about as good as the majority answer), or `fitted` by logistic regression to the topics (it
    separates them: far above the majority answer)."""
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3, ignore_mismatched_sizes=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    frame = topic_frame(30)
    batch = tokenizer(frame["text"].tolist(), truncation=True, max_length=16, padding=True, return_tensors="pt")
    torch.manual_seed(1)
    with torch.no_grad():
        pooled = model.bert(**batch).pooler_output  # nearly the same vector for every text: centre it, then scale it up
        centre = pooled.mean(0)
        if fitted:  # the label ids the train stage gives: sorted label names
            fit = LogisticRegression(C=1e6, max_iter=10_000).fit((pooled - centre).numpy(), frame["label"].map(
                {label: index for index, label in enumerate(sorted(frame["label"].unique()))}))
            model.classifier.weight.copy_(torch.tensor(fit.coef_, dtype=torch.float32))
            model.classifier.bias.copy_(torch.tensor(fit.intercept_, dtype=torch.float32) - model.classifier.weight @ centre)
        else:
            model.classifier.weight.normal_(0, 1000.0)
            model.classifier.bias.copy_(-model.classifier.weight @ centre)
        assert len(model(**batch).logits.argmax(-1).unique()) == 3
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def spread_model(tiny_model, tmp_path_factory) -> Path:
    return classifier_model(tiny_model, tmp_path_factory.mktemp("spread-bert"), fitted=False)


@pytest.fixture(scope="module")
def fitted_model(tiny_model, tmp_path_factory) -> Path:
    return classifier_model(tiny_model, tmp_path_factory.mktemp("fitted-bert"), fitted=True)


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> dict[str, Path]:
    frame = topic_frame(30)
    frame = frame[(frame.label != "music") | (frame.index % 4 == 0)]  # few "music" rows: imbalanced train split
    return stage_inputs("train", gated_params(tmp_path_factory.mktemp("collapse"), frame))


def run(gated, model: Path, tmp_path: Path, name: str, **train) -> dict:
    from tasks.train import train as train_stage

    cfg = TrainConfig(**{"epochs": 2, "batch_size": 16, "warmup_ratio": 0.0, "save_every_s": 3600, **train})
    return train_stage(**gated, model_cfg=ModelConfig(base=str(model), max_length=16), cfg=cfg,
                       out_dir=tmp_path / name / "model", work_dir=tmp_path / name / "work").summary


@pytest.fixture(scope="module")
def still(fitted_model, gated, tmp_path_factory) -> tuple[dict, Path]:
    """A run whose weights do not move: the fitted base model's predictions, far above the majority answer."""
    folder = tmp_path_factory.mktemp("still")
    return run(gated, fitted_model, folder, "still", learning_rate=STILL), folder / "still" / "model"


def test_no_restart_above_the_majority_answer(still):
    summary, model_dir = still
    restart, (only,) = summary["collapse_restart"], summary["attempts"]
    assert not summary["diagnostics"]["collapsed"] and restart["fired"] is False
    assert only["kept_macro_f1"] > restart["stuck_at_or_below"] == pytest.approx(restart["majority_macro_f1"] + 0.1)
    assert not only["stuck"]
    assert summary["learning_rate"] == STILL and summary["epochs_run"] == 2 and only["seed"] == 42
    assert "collapse restart | not needed" in (model_dir / "report.md").read_text()


def test_collapse_restarts_once_from_the_base_weights_with_a_new_seed_and_an_epoch_more(fitted_model, gated, still,
                                                                                        tmp_path, capfd):
    from tuneflow.trained import read_logits

    # lr x 1e-15: the second attempt trains at 1e-12, so its weights are the base model's, and it no longer collapses
    summary = run(gated, fitted_model, tmp_path, "rescued", learning_rate=ABSURD, collapse_restart_lr_factor=1e-15)
    first, second = summary["attempts"]
    assert first["collapsed"] and first["stuck"] and (first["learning_rate"], first["seed"], first["epochs"]) == (ABSURD, 42, 2)
    assert [e["epoch"] for e in first["validation"]] == [1.0, 2.0]  # the first attempt runs to its end
    assert not second["stuck"] and (second["seed"], second["epochs"]) == (43, 3)
    assert second["learning_rate"] == pytest.approx(ABSURD * 1e-15)
    assert [e["epoch"] for e in second["validation"]] == [1.0, 2.0, 3.0] and summary["epochs_run"] == 3
    assert summary["collapse_restart"]["fired"] is True and not summary["diagnostics"]["collapsed"]
    assert summary["learning_rate"] == pytest.approx(ABSURD * 1e-15)
    # from the base weights, not from the collapsed ones: the kept model answers as the untrained base model does
    kept = read_logits(tmp_path / "rescued" / "model" / "validation_logits.npy")
    assert np.abs(kept - read_logits(still[1] / "validation_logits.npy")).max() < 1e-4
    assert "collapse restart | fired" in (tmp_path / "rescued" / "model" / "report.md").read_text()
    assert "restarting once from the base weights with seed 43, 3 epochs, learning rate 1e-12" in capfd.readouterr().err


def test_a_plateau_beside_the_majority_answer_restarts_too(spread_model, gated, tmp_path):
    """Several classes predicted, but no better than the majority answer: stuck, not collapsed. The still weights stay
    stuck in the restart too, which then warns (it runs once)."""
    summary = run(gated, spread_model, tmp_path, "plateau", learning_rate=STILL)
    restart = summary["collapse_restart"]
    first, second = summary["attempts"]
    assert first["validation"][-1]["predicted_classes"] > 1 and not first["collapsed"]
    assert first["kept_macro_f1"] <= restart["stuck_at_or_below"] and first["stuck"] and restart["fired"] and second["stuck"]
    assert not summary["diagnostics"]["collapsed"]  # the diagnosis (and the gate) still call this no collapse
    assert any("learned no more than the majority answer" in warning for warning in summary["diagnostics"]["warnings"])


def test_the_restart_runs_once_even_when_it_collapses_too(spread_model, gated, tmp_path):
    summary = run(gated, spread_model, tmp_path, "twice", learning_rate=ABSURD)  # the same absurd rate again
    assert [attempt["collapsed"] for attempt in summary["attempts"]] == [True, True]
    assert [attempt["learning_rate"] for attempt in summary["attempts"]] == [ABSURD, ABSURD]
    assert summary["diagnostics"]["collapsed"]  # the gate still refuses it
    assert any("learned no more than the majority answer" in warning for warning in summary["diagnostics"]["warnings"])


def test_no_restart_when_switched_off(spread_model, gated, tmp_path):
    summary = run(gated, spread_model, tmp_path, "off", learning_rate=ABSURD, collapse_restart=False)
    assert summary["diagnostics"]["collapsed"] and len(summary["attempts"]) == 1
    assert summary["collapse_restart"]["fired"] is False and summary["epochs_run"] == 2


def test_stuck_is_the_kept_epoch_within_the_margin_of_the_majority_answer():
    from tuneflow.training import attempt_record, majority_macro_f1

    assert majority_macro_f1([0, 0, 0, 1]) == pytest.approx((2 * 0.75 / 1.75) / 2)  # F1 of the majority class, over 2
    assert majority_macro_f1([2, 2, 0, 1, 1, 1]) == pytest.approx((2 * 0.5 / 1.5) / 3)
    history = [{"step": 1, "epoch": 1.0, "eval_macro_f1": 0.60, "eval_accuracy": 0.9, "eval_predicted_classes": 2},
               {"step": 2, "epoch": 2.0, "eval_macro_f1": 0.50, "eval_accuracy": 0.9, "eval_predicted_classes": 2}]
    record = attempt_record(history, 1e-3, 42, 2, 1.0, classes=2, keeps_best=True, stuck_at_or_below=0.55)
    assert record["kept_macro_f1"] == 0.60 and not record["stuck"]
    record = attempt_record(history, 1e-3, 42, 2, 1.0, classes=2, keeps_best=False, stuck_at_or_below=0.55)
    assert record["kept_macro_f1"] == 0.50 and record["stuck"]  # a method that keeps its last epoch
    assert attempt_record(history, 1e-3, 42, 2, 1.0, classes=2, keeps_best=True, stuck_at_or_below=0.60)["stuck"]


def trainer_loss(gated, model: Path, tmp_path: Path, monkeypatch, name: str, **train) -> tuple[float, float, float, dict]:
    """The loss the Trainer that train() built computes on one imbalanced batch, next to plain and balanced-weighted
    cross-entropy of the same batch, and the run's class_weights record."""
    import tasks.train
    from sklearn.utils.class_weight import compute_class_weight
    from transformers.modeling_outputs import SequenceClassifierOutput

    built = []
    real = tasks.train.build_trainer

    def build_and_keep(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(tasks.train, "build_trainer", build_and_keep)
    summary = run(gated, model, tmp_path, name, epochs=1, learning_rate=STILL, **train)
    labels = np.array([row["labels"] for row in built[-1].train_dataset])
    counts = np.bincount(labels)
    weights = torch.tensor(compute_class_weight("balanced", classes=np.arange(len(counts)), y=labels), dtype=torch.float32)
    rare, common = int(counts.argmin()), int(counts.argmax())
    batch, logits = torch.tensor([common, common, common, rare]), torch.full((4, len(counts)), -1.0)
    logits[:, common] = 2.0

    def model(**inputs):  # as an HF classifier answers: its own (plain) loss when it is given the labels
        own = torch.nn.functional.cross_entropy(logits, inputs["labels"]) if "labels" in inputs else None
        return SequenceClassifierOutput(loss=own, logits=logits)

    loss = built[-1].compute_loss(model, {"labels": batch}).item()
    return (loss, torch.nn.functional.cross_entropy(logits, batch).item(),
            torch.nn.functional.cross_entropy(logits, batch, weight=weights).item(), summary["class_weights"])


def test_class_weights_auto_turns_on_only_at_the_ratio(spread_model, gated, tmp_path, monkeypatch):
    loss, plain, weighted, record = trainer_loss(gated, spread_model, tmp_path, monkeypatch, "auto")
    ratio = record["train_class_ratio"]
    assert ratio >= 3 and weighted > 1.5 * plain  # the fixture's train split is imbalanced enough to tell them apart
    assert record["setting"] == "auto" and record["applied"] == "balanced" and record["auto_ratio"] == 3
    assert loss == pytest.approx(weighted, rel=1e-6)
    # the same split with the ratio set above it: plain cross-entropy
    loss, plain, _, record = trainer_loss(gated, spread_model, tmp_path, monkeypatch, "above", class_weights_auto_ratio=ratio + 0.1)
    assert record["applied"] == "none" and loss == pytest.approx(plain, rel=1e-6)
    loss, plain, _, record = trainer_loss(gated, spread_model, tmp_path, monkeypatch, "none", class_weights="none")
    assert record == {"setting": "none", "applied": "none", "train_class_ratio": ratio} and loss == pytest.approx(plain, rel=1e-6)


def test_class_weighting_decision():
    from tuneflow.training import class_weighting

    balanced = class_weighting("auto", [0, 1, 1, 2, 2, 2], 3.0)
    assert balanced["applied"] == "balanced" and balanced["train_class_ratio"] == 3.0  # at the ratio: on
    assert class_weighting("auto", [0, 1, 1, 2, 2], 3.0)["applied"] == "none"
    assert class_weighting("balanced", [0, 1], 3.0)["applied"] == "balanced"
    assert class_weighting("none", [0, 0, 0, 0, 1], 3.0)["applied"] == "none"
