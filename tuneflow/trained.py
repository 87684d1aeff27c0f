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
from tuneflow.onnx_runtime import INPUT_NAMES, encode


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


def predict_logits(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int) -> np.ndarray:
    """A PyTorch classifier's logits (float32) in eval mode, in the order of `texts`, its inputs encoded as the ONNX model's are."""
    device = next(model.parameters()).device
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            inputs = encode(tokenizer, texts[start : start + batch_size], max_length)
            logits = model(**{name: torch.from_numpy(inputs[name]).to(device) for name in INPUT_NAMES}).logits
            outputs.append(logits.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.empty((0, model.config.num_labels), dtype=np.float32)


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
