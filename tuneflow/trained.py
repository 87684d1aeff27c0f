"""The trained model as one plain PyTorch classifier: merged where its method can merge, else base + add-on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuneflow import artifacts
from tuneflow.artifacts import read_json
from tuneflow.config import ModelConfig
from tuneflow.methods import METHODS
from tuneflow.models import load_classifier


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
