"""No collapse by default (issue 13): the restart at a lower learning rate when validation predicts one class for every
text, and class_weights auto. Proved by effect on tiny config-built models: an absurd learning rate collapses them, a
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


@pytest.fixture(scope="module")
def spread_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny BERT with a classifier scaled up, so that its untrained predictions differ from text to text (the
    plain tiny model answers one class for everything, which the diagnosis would rightly call a collapse)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("spread-bert")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3, ignore_mismatched_sizes=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batch = tokenizer(topic_frame(30)["text"].tolist(), truncation=True, max_length=16, padding=True, return_tensors="pt")
    torch.manual_seed(1)
    with torch.no_grad():
        pooled = model.bert(**batch).pooler_output  # nearly the same vector for every text: centre it, then scale it up
        model.classifier.weight.normal_(0, 1000.0)
        model.classifier.bias.copy_(-model.classifier.weight @ pooled.mean(0))
        assert len(model(**batch).logits.argmax(-1).unique()) == 3
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
def still(spread_model, gated, tmp_path_factory) -> tuple[dict, Path]:
    """A run whose weights do not move: the base model's spread predictions, so no collapse."""
    folder = tmp_path_factory.mktemp("still")
    return run(gated, spread_model, folder, "still", learning_rate=STILL), folder / "still" / "model"


def test_no_restart_when_validation_predicts_several_classes(still):
    summary, model_dir = still
    assert not summary["diagnostics"]["collapsed"]
    assert summary["collapse_restart"]["fired"] is False and len(summary["attempts"]) == 1
    assert summary["learning_rate"] == STILL and summary["epochs_run"] == 2
    assert "collapse restart | not needed" in (model_dir / "report.md").read_text()


def test_collapse_restarts_once_from_the_base_weights_at_a_lower_learning_rate(spread_model, gated, still, tmp_path, capfd):
    from tuneflow.trained import read_logits

    # ÷1e15: the second attempt trains at 1e-12, so its weights are the base model's, and it no longer collapses
    summary = run(gated, spread_model, tmp_path, "rescued", learning_rate=ABSURD, collapse_restart_lr_divisor=1e15, epochs=3)
    first, second = summary["attempts"]
    assert first["collapsed"] and first["learning_rate"] == ABSURD
    # stopped at the first evaluation that predicted one class, before its last epoch
    assert [e["predicted_classes"] == 1 for e in first["validation"]] == [False] * (len(first["validation"]) - 1) + [True]
    assert len(first["validation"]) < 3
    assert not second["collapsed"] and second["learning_rate"] == pytest.approx(ABSURD / 1e15)
    assert [e["epoch"] for e in second["validation"]] == [1.0, 2.0, 3.0]
    assert summary["collapse_restart"] == {"enabled": True, "fired": True, "lr_divisor": 1e15, "first_learning_rate": ABSURD,
                                           "learning_rate": pytest.approx(ABSURD / 1e15)}
    assert summary["learning_rate"] == pytest.approx(ABSURD / 1e15) and not summary["diagnostics"]["collapsed"]
    # from the base weights, not from the collapsed ones: the kept model answers as the untrained base model does
    kept = read_logits(tmp_path / "rescued" / "model" / "validation_logits.npy")
    assert np.abs(kept - read_logits(still[1] / "validation_logits.npy")).max() < 1e-4
    assert "collapse restart | fired" in (tmp_path / "rescued" / "model" / "report.md").read_text()
    assert "restarting once from the base weights at learning rate 1e-12" in capfd.readouterr().err


def test_the_restart_runs_once_even_when_it_collapses_too(spread_model, gated, tmp_path):
    summary = run(gated, spread_model, tmp_path, "twice", learning_rate=ABSURD)  # ÷3 is still absurd
    assert [attempt["collapsed"] for attempt in summary["attempts"]] == [True, True]
    assert [attempt["learning_rate"] for attempt in summary["attempts"]] == [ABSURD, pytest.approx(ABSURD / 3)]
    assert summary["diagnostics"]["collapsed"]  # the gate still refuses it
    assert any("collapsed too" in warning for warning in summary["diagnostics"]["warnings"])


def test_no_restart_when_switched_off(spread_model, gated, tmp_path):
    summary = run(gated, spread_model, tmp_path, "off", learning_rate=ABSURD, collapse_restart=False)
    assert summary["diagnostics"]["collapsed"] and len(summary["attempts"]) == 1
    assert summary["collapse_restart"]["fired"] is False and summary["epochs_run"] == 2


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
