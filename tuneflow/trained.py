"""The trained model as one plain PyTorch classifier: merged where its method can merge, else base + add-on.

Also the trained model's validation logits, which train saves and export's parity checks compare with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneflow import artifacts
from tuneflow.artifacts import read_json
from tuneflow.config import ModelConfig
from tuneflow.methods import METHODS
from tuneflow.models import load_classifier
from tuneflow.windows import INPUT_NAMES, LongText, Windower


def load_trained(model_dir: Path, model_cfg: ModelConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in eval mode and its training summary."""
    summary = read_json(model_dir / artifacts.TRAIN_SUMMARY)
    base_cfg = model_cfg.model_copy(update={"base": summary["base_model"]})
    model = METHODS[summary["method"]].load_merged(
        model_dir, lambda **kwargs: load_classifier(base_cfg, summary["labels"], **kwargs), summary["export_record"])
    return model.eval(), summary


class LogitsOnly(torch.nn.Module):
    """Positional tensors in, logits out: the signature the ONNX graph gets."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def predict_logits(model: torch.nn.Module, tokenizer, texts: list[str], long_text: LongText, batch_size: int) -> np.ndarray:
    """A PyTorch classifier's logits (float32) in eval mode, one row per text in the order of `texts`: its inputs are the
    windows the ONNX model gets (tuneflow/windows.py), `batch_size` windows at a time, pooled per text as served."""
    device = next(model.parameters()).device
    model.eval()

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        logits = model(**{name: torch.from_numpy(inputs[name]).to(device) for name in INPUT_NAMES}).logits
        return logits.float().cpu().numpy()

    with torch.no_grad():
        return Windower(tokenizer, long_text).logits(run, texts, batch_size, model.config.num_labels)


def summary_long_text(summary: dict[str, Any]) -> LongText:
    """The policy a model was trained with, from its train_summary.json (truncate for a model trained before it existed)."""
    return LongText.from_record(summary.get("long_text"), summary["max_length"])


def write_logits(path: Path, logits: np.ndarray) -> None:
    np.save(path, logits.astype(np.float32), allow_pickle=False)


def read_logits(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def texts_hash(texts: list[str]) -> str:
    """Identifies the texts a logits file was computed on (export checks it is scoring the same validation split)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()
