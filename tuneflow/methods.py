"""The one table of fine-tuning methods: everything about a method, by name (as PEFT's mapping does).

An entry names the `train.*` options it reads (their schemas live here too), its Trainer callbacks, whether
it supports gradual unfreezing, what it must record for export, and how it wraps, saves and exports the model.
No method name appears anywhere else in tuneflow; the config validator and the tests iterate this table.

`wrap(load_base, cfg)` loads the base classifier (`load_base(**from_pretrained_kwargs)`) and turns it into
the model the Trainer trains. `save` writes the trained model (None: the Trainer's `save_model`, which
also gathers ZeRO-3 shards; PEFT saves the adapter only, a plain model all weights). `load_merged`
rebuilds an `nn.Module` for ONNX: the trained weights folded into the base where the method can merge
(`export="merged"`), otherwise the base plus its trained add-on, exported as one graph (`export="wrapper"`).
`export_blocker` says at train time why a trained model could not be exported (None: it can).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

from pydantic import Field

from tuneflow.errors import InputError
from tuneflow.schema import Section

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

LoadBase = Callable[..., "PreTrainedModel"]
ADAPTER_NAME = "task"
DEFAULT_METHOD = "lora"


# --- the options sections (train.<section> in params.yaml) -------------------------------------------

class LoraOptions(Section):
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class AdaLoraOptions(Section):
    init_r: int = Field(default=12, ge=1)
    target_r: int = Field(default=8, ge=1)
    tinit_fraction: float = Field(default=0.1, ge=0, lt=1)  # warm-up share of steps before rank pruning
    tfinal_fraction: float = Field(default=0.2, ge=0, lt=1)  # final share of steps with the budget fixed


class QLoraOptions(Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class IA3Options(Section):
    target_modules: list[str] | None = None  # None: PEFT's default for the architecture
    feedforward_modules: list[str] | None = None


class PromptLearningOptions(Section):
    num_virtual_tokens: int = Field(default=20, ge=1)
    prefix_projection: bool = False  # prefix: reparameterise through an MLP (Li & Liang) instead of P-tuning v2 raw prefixes
    encoder_hidden_size: int = Field(default=128, ge=1)  # p_tuning's prompt encoder (and the prefix projection)


class AdapterOptions(Section):
    reduction_factor: int = Field(default=16, ge=1)
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = "relu"


class TrainOptions(Protocol):
    """What a method reads of the `train` section (tuneflow.config.TrainConfig, which validates against this table)."""

    unfreeze_layers: int
    gradient_checkpointing: bool
    lora: LoraOptions
    adalora: AdaLoraOptions
    qlora: QLoraOptions
    ia3: IA3Options
    prompt_learning: PromptLearningOptions
    adapter: AdapterOptions


@dataclass(frozen=True)
class RunInfo:
    """What a method may need to know about the run beyond its config."""

    total_steps: int
    bf16: bool


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    export: Literal["merged", "wrapper"]
    wrap: Callable[[LoadBase, TrainOptions, RunInfo], "nn.Module"]
    load_merged: Callable[[Path, LoadBase, dict[str, Any]], "nn.Module"]
    options: tuple[str, ...] = ()  # the train.* keys and sections it reads beyond the common ones
    save: Callable[["nn.Module", Path], None] | None = None
    callbacks: Callable[[], list[Any]] = lambda: []  # extra Trainer callbacks
    unfreezing: bool = False  # train.gradual_unfreezing applies
    # what export needs to rebuild the trained model (kept in train_summary.json["export_record"])
    export_record: Callable[[TrainOptions], dict[str, Any]] = lambda cfg: {}
    export_blocker: Callable[["nn.Module", TrainOptions, int], str | None] = lambda model, cfg, max_length: None
    virtual_tokens: Callable[[TrainOptions], int] = lambda cfg: 0
    # False where a checkpoint cannot be loaded back into the training model: AdaLoRA saves rank-pruned
    # tensors that PEFT's load_adapter cannot put into the live model, so no best-epoch reload and no resume
    reload_checkpoints: bool = True
    # a learning rate that suits the method; `tuneflow compare` uses it unless train.learning_rate is set
    suggested_lr: float = 1e-3
    # test macro-F1 measured in each comparison of QUALITY_TABLES (`tuneflow plan`'s expected quality)
    measured_macro_f1: dict[str, float] = field(default_factory=dict)


# --- full and partial -------------------------------------------------------------------------------

def _full_wrap(load_base: LoadBase, cfg: TrainOptions, run: RunInfo) -> "nn.Module":
    return load_base()


def _partial_wrap(load_base: LoadBase, cfg: TrainOptions, run: RunInfo) -> "nn.Module":
    """Freeze the encoder (embeddings and all blocks) except its top `unfreeze_layers` blocks; pooler and head train."""
    from tuneflow.training import encoder_layers

    model = load_base()
    layers = encoder_layers(model)
    if cfg.unfreeze_layers > len(layers):
        raise InputError(f"train.unfreeze_layers={cfg.unfreeze_layers}: the base model has only {len(layers)} encoder blocks")
    for parameter in model.base_model.parameters():
        parameter.requires_grad = False
    for block in list(layers)[len(layers) - cfg.unfreeze_layers:] if cfg.unfreeze_layers else []:
        block.requires_grad_(True)
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(True)
    return model


def _full_load(model_dir: Path, load_base: LoadBase, record: dict[str, Any]) -> "nn.Module":
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)


# --- PEFT: LoRA family and IA3 (merged for export) ------------------------------------------------

def _lora_config(cfg: TrainOptions, run: RunInfo | None = None, **extra: Any):
    from peft import LoraConfig, TaskType

    lora = cfg.lora
    return LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, **extra)


def _peft(config_for: Callable[..., Any]) -> Callable[[LoadBase, TrainOptions, RunInfo], "nn.Module"]:
    def wrap(load_base: LoadBase, cfg: TrainOptions, run: RunInfo) -> "nn.Module":
        from peft import get_peft_model

        return get_peft_model(load_base(), config_for(cfg, run))

    return wrap


def _adalora_config(cfg: TrainOptions, run: RunInfo):
    from peft import AdaLoraConfig, TaskType

    ada, lora, total = cfg.adalora, cfg.lora, run.total_steps
    return AdaLoraConfig(task_type=TaskType.SEQ_CLS, init_r=ada.init_r, target_r=ada.target_r, lora_alpha=lora.alpha,
                         lora_dropout=lora.dropout, target_modules=lora.target_modules, total_step=total,
                         tinit=int(ada.tinit_fraction * total), tfinal=int(ada.tfinal_fraction * total))


def _adalora_callbacks() -> list[Any]:
    from tuneflow.training import AdaLoraBudget

    return [AdaLoraBudget()]


def _ia3_config(cfg: TrainOptions, run: RunInfo):
    from peft import IA3Config, TaskType

    return IA3Config(task_type=TaskType.SEQ_CLS, target_modules=cfg.ia3.target_modules,
                     feedforward_modules=cfg.ia3.feedforward_modules)


def _peft_load_merged(model_dir: Path, load_base: LoadBase, record: dict[str, Any]) -> "nn.Module":
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(), model_dir).merge_and_unload()


# --- QLoRA: LoRA on a 4-bit NF4 base; de-quantised before merging --------------------------------

def _bnb_config(quant_type: str, double_quant: bool, compute_dtype: str):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype), llm_int8_skip_modules=["classifier", "pooler"])


def _qlora_wrap(load_base: LoadBase, cfg: TrainOptions, run: RunInfo) -> "nn.Module":
    from peft import get_peft_model, prepare_model_for_kbit_training

    compute_dtype = "bfloat16" if run.bf16 else "float32"
    base = load_base(quantization_config=_bnb_config(cfg.qlora.quant_type, cfg.qlora.double_quant, compute_dtype))
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    _keep_4bit_layout_trainable(base)
    return get_peft_model(base, _lora_config(cfg))


def _keep_4bit_layout_trainable(model: "nn.Module") -> None:
    """On AVX512-BF16 CPUs, bitsandbytes repacks 4-bit weights into an inference-only layout at the first
    forward in eval mode (the Trainer's per-epoch evaluation) and keeps it: training then goes through a kernel
    that fails for layers narrower than a quantisation block. Keep the trainable layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _qlora_record(cfg: TrainOptions) -> dict[str, Any]:
    return {"qlora": cfg.qlora.model_dump(mode="json")}


def _qlora_load_merged(model_dir: Path, load_base: LoadBase, record: dict[str, Any]) -> "nn.Module":
    """Quantise the base exactly as in training, de-quantise it to fp32, then merge: never merge into 4-bit weights."""
    import torch
    from peft import PeftModel

    quant = record["qlora"]
    quantized = load_base(quantization_config=_bnb_config(quant["quant_type"], quant["double_quant"], "float32"))
    base = quantized.dequantize().to(torch.float32)  # bitsandbytes de-quantises to fp16 by default
    return PeftModel.from_pretrained(base, model_dir).merge_and_unload()


# --- PEFT prompt learning (cannot merge: exported as base + prompt through a wrapper) -------------

def _prefix_config(cfg: TrainOptions, run: RunInfo):
    from peft import PrefixTuningConfig, TaskType

    prompt = cfg.prompt_learning
    return PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=prompt.num_virtual_tokens,
                              prefix_projection=prompt.prefix_projection, encoder_hidden_size=prompt.encoder_hidden_size)


def _prompt_config(cfg: TrainOptions, run: RunInfo):
    from peft import PromptTuningConfig, TaskType

    return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=cfg.prompt_learning.num_virtual_tokens)


def _p_tuning_config(cfg: TrainOptions, run: RunInfo):
    from peft import PromptEncoderConfig, TaskType

    prompt = cfg.prompt_learning
    return PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=prompt.num_virtual_tokens,
                               encoder_hidden_size=prompt.encoder_hidden_size)


def _peft_load_unmerged(model_dir: Path, load_base: LoadBase, record: dict[str, Any]) -> "nn.Module":
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(), model_dir)


def _prompt_tokens(cfg: TrainOptions) -> int:
    return cfg.prompt_learning.num_virtual_tokens


def _prompt_blocker(model: "nn.Module", cfg: TrainOptions, max_length: int) -> str | None:
    """Virtual tokens occupy positions (soft prompts in the input; prefixes shift BERT's position ids by the
    cache length): text + virtual tokens must fit the position embeddings."""
    positions = getattr(model.config, "max_position_embeddings", None)
    needed = max_length + cfg.prompt_learning.num_virtual_tokens
    if positions is not None and needed > positions:
        return (f"model.max_length {max_length} + train.prompt_learning.num_virtual_tokens "
                f"{cfg.prompt_learning.num_virtual_tokens} = {needed} exceeds the model's {positions} positions")
    return None


# --- AdapterHub bottleneck adapters (cannot merge: exported as base + adapter modules) -----------

def _bottleneck(config_name: str) -> Callable[[LoadBase, TrainOptions, RunInfo], "nn.Module"]:
    def wrap(load_base: LoadBase, cfg: TrainOptions, run: RunInfo) -> "nn.Module":
        import adapters

        model = load_base()
        adapters.init(model)
        config = adapters.AdapterConfig.load(config_name, reduction_factor=cfg.adapter.reduction_factor,
                                             non_linearity=cfg.adapter.non_linearity)
        model.add_adapter(ADAPTER_NAME, config=config)
        model.train_adapter(ADAPTER_NAME)  # freezes the base; the adapter and the (static) head train
        return model

    return wrap


def _adapter_save(model: "nn.Module", out_dir: Path) -> None:
    model.save_adapter(str(out_dir), ADAPTER_NAME, with_head=True, use_safetensors=True)
    model.config.save_pretrained(out_dir)


def _adapter_load(model_dir: Path, load_base: LoadBase, record: dict[str, Any]) -> "nn.Module":
    import adapters

    model = load_base()
    adapters.init(model)
    model.load_adapter(str(model_dir), load_as=ADAPTER_NAME, with_head=True, set_active=True, use_safetensors=True)
    return model


@dataclass(frozen=True)
class QualityTable:
    """One measured comparison of every method on the same data and settings (benchmarks/RESULTS.md)."""

    description: str
    train_rows: int
    epochs: float
    where: str


QUALITY_TABLES: dict[str, QualityTable] = {
    "mr-3k-1ep": QualityTable("MR polarity, 3,000-row stratified sample, MiniLM-L6, 1 epoch, batch 16, bf16, each method at "
                              "its suggested_lr", 2100, 1, "benchmarks/RESULTS.md, Method comparison rerun, 2026-11-24 05:14"),
    "mr-full-2ep": QualityTable("MR polarity, full default split, MiniLM-L6, 2 epochs, batch 16, bf16, each method at its "
                                "suggested_lr", 7462, 2, "benchmarks/RESULTS.md, Method comparison on the full MR split, 2026-11-24 09:09"),
}


def _measured(mr_3k_1ep: float, mr_full_2ep: float) -> dict[str, float]:
    return {"mr-3k-1ep": mr_3k_1ep, "mr-full-2ep": mr_full_2ep}


LORA, PROMPT = ("lora",), ("prompt_learning",)
METHODS: dict[str, Method] = {method.name: method for method in [
    Method("full", "all weights trained", "merged", _full_wrap, _full_load, unfreezing=True, suggested_lr=5e-5,
           measured_macro_f1=_measured(0.7732, 0.8284)),
    Method("partial", "encoder frozen except its top train.unfreeze_layers blocks; pooler and head train", "merged",
           _partial_wrap, _full_load, options=("unfreeze_layers",), unfreezing=True, suggested_lr=2e-4,
           measured_macro_f1=_measured(0.79, 0.8078)),
    Method("lora", "low-rank adapters (PEFT LoRA) on train.lora.target_modules, merged for export", "merged",
           _peft(_lora_config), _peft_load_merged, options=LORA,
           measured_macro_f1=_measured(0.8099, 0.8251)),
    Method("dora", "weight-decomposed LoRA (PEFT use_dora), merged for export", "merged",
           _peft(lambda cfg, run: _lora_config(cfg, use_dora=True)), _peft_load_merged, options=LORA,
           measured_macro_f1=_measured(0.8033, 0.8218)),
    Method("adalora", "LoRA with adaptive rank budget (PEFT AdaLoRA), merged for export", "merged",
           _peft(_adalora_config), _peft_load_merged, options=("adalora", "lora"), callbacks=_adalora_callbacks,
           reload_checkpoints=False,
           measured_macro_f1=_measured(0.5964, 0.8021)),
    Method("ia3", "learned rescaling of keys, values and FFN activations (PEFT IA3), merged for export", "merged",
           _peft(_ia3_config), _peft_load_merged, options=("ia3",), suggested_lr=5e-3,
           measured_macro_f1=_measured(0.7449, 0.8054)),
    Method("qlora", "LoRA on a 4-bit NF4 base (bitsandbytes); base de-quantised to fp32, then merged for export", "merged",
           _qlora_wrap, _qlora_load_merged, options=("qlora", "lora", "gradient_checkpointing"), export_record=_qlora_record,
           measured_macro_f1=_measured(0.8, 0.8143)),
    Method("prefix", "trained key/value prefixes on every layer (PEFT prefix tuning, P-tuning v2 style)", "wrapper",
           _peft(_prefix_config), _peft_load_unmerged, options=PROMPT, export_blocker=_prompt_blocker,
           virtual_tokens=_prompt_tokens, suggested_lr=1e-2,
           measured_macro_f1=_measured(0.7041, 0.782)),
    Method("prompt", "trained soft prompt prepended to the input embeddings (PEFT prompt tuning)", "wrapper",
           _peft(_prompt_config), _peft_load_unmerged, options=PROMPT, export_blocker=_prompt_blocker,
           virtual_tokens=_prompt_tokens, suggested_lr=3e-2,
           measured_macro_f1=_measured(0.5997, 0.7539)),
    Method("p_tuning", "soft prompt produced by an MLP prompt encoder (PEFT P-tuning)", "wrapper",
           _peft(_p_tuning_config), _peft_load_unmerged, options=PROMPT, export_blocker=_prompt_blocker,
           virtual_tokens=_prompt_tokens, suggested_lr=1e-2,
           measured_macro_f1=_measured(0.5865, 0.7488)),
    Method("adapter_houlsby", "bottleneck adapters after attention and FFN (AdapterHub double_seq_bn)", "wrapper",
           _bottleneck("double_seq_bn"), _adapter_load, options=("adapter",), save=_adapter_save,
           measured_macro_f1=_measured(0.759, 0.8158)),
    Method("adapter_pfeiffer", "bottleneck adapter after the FFN (AdapterHub seq_bn)", "wrapper",
           _bottleneck("seq_bn"), _adapter_load, options=("adapter",), save=_adapter_save,
           measured_macro_f1=_measured(0.7463, 0.8092)),
]}
