"""The one table of fine-tuning methods: name -> how to wrap the model, how to load it back merged for export.

A method's `wrap` turns a freshly loaded base classifier into the model the Trainer trains; `save` is
`save_pretrained` on whatever `wrap` returned (PEFT saves the adapter only, a plain model saves all
weights); `load_merged` rebuilds a plain `nn.Module` with the trained weights folded in, ready for ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneflow.config import TrainConfig


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    wrap: Callable[["PreTrainedModel", "TrainConfig"], "PreTrainedModel"]
    load_merged: Callable[[Path, Callable[[], "PreTrainedModel"]], "PreTrainedModel"]


def _full_wrap(model: "PreTrainedModel", cfg: "TrainConfig") -> "PreTrainedModel":
    return model


def _full_load(model_dir: Path, load_base: Callable[[], "PreTrainedModel"]) -> "PreTrainedModel":
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir)


def _lora_wrap(model: "PreTrainedModel", cfg: "TrainConfig") -> "PreTrainedModel":
    from peft import LoraConfig, TaskType, get_peft_model

    lora = cfg.lora
    return get_peft_model(
        model,
        LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules),
    )


def _peft_load_merged(model_dir: Path, load_base: Callable[[], "PreTrainedModel"]) -> "PreTrainedModel":
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(), model_dir).merge_and_unload()


METHODS: dict[str, Method] = {
    "full": Method("full", "all weights trained", _full_wrap, _full_load),
    "lora": Method("lora", "low-rank adapters on the linear layers (PEFT), merged for export", _lora_wrap, _peft_load_merged),
}
