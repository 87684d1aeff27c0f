"""The one config schema: params.yaml, pipelines.yaml and `--set key=value` overrides."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tuneflow.errors import InputError
from tuneflow.methods import (DEFAULT_METHOD, METHODS, AdaLoraOptions, AdapterOptions, IA3Options, LoraOptions,
                              PromptLearningOptions, QLoraOptions)
from tuneflow.schema import Section

BUILTIN_BBC = "builtin:bbc"
BUILTIN_MINILM = "builtin:all-MiniLM-L6-v2"


class DataConfig(Section):
    source: str = BUILTIN_BBC
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "folder"] = "auto"  # auto: by extension, folder if a directory
    text_column: str | int = "text"
    label_column: str | int = "label"
    sample: int | None = Field(default=None, gt=0)
    dedup: bool = True
    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.2, gt=0, lt=0.5)
    split_salt: str = "tuneflow"  # a row's split is a function of its folded text and this salt (tuneflow/text.py)
    seed: int = 42  # data.sample's draw
    slice_columns: list[str] = []  # metadata columns carried through the pipeline; evaluate reports metrics per value
    max_invalid_fraction: float = Field(default=0.1, ge=0, le=1)
    encoding: str = "utf-8"

    @field_validator("slice_columns")
    @classmethod
    def _not_reserved(cls, columns: list[str]) -> list[str]:
        reserved = sorted({"text", "label"} & set(columns))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} name the splits' own columns; a slice column needs another name")
        return columns


class ValidationConfig(Section):
    evidence_rows: int = Field(default=20, ge=1)  # evidence items kept per check in report.json
    min_rows_per_split: int = Field(default=1, ge=1)
    min_text_chars: int = Field(default=1, ge=1)  # folded text length bounds (GX expectation)
    max_text_chars: int = Field(default=100_000, ge=1)
    max_class_ratio: float = Field(default=10, ge=1)  # largest / smallest class in train
    min_class_rows: int = Field(default=3, ge=1)  # every class in train
    min_total_rows: int = Field(default=1000, ge=0)  # below: warning only
    near_dup_jaccard: float = Field(default=0.8, gt=0, le=1)  # true Jaccard of character shingles
    max_near_dup_leak: int = Field(default=0, ge=0)  # near-duplicate pairs across splits tolerated
    shingle_chars: int = Field(default=5, ge=1)
    num_perm: int = Field(default=64, ge=16)  # MinHash permutations
    fix: bool = False  # remove leaked/conflicting rows from validation/test, then re-validate

    @model_validator(mode="after")
    def _length_bounds(self) -> "ValidationConfig":
        if self.min_text_chars > self.max_text_chars:
            raise ValueError(f"min_text_chars {self.min_text_chars} exceeds max_text_chars {self.max_text_chars}")
        return self


class ModelConfig(Section):
    base: str = BUILTIN_MINILM
    # None/"auto": the `max_length_percentile` of the training texts' token lengths, capped by the model
    max_length: int | Literal["auto"] | None = Field(default="auto")
    max_length_percentile: float = Field(default=99, gt=0, le=100)
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _max_length_range(self) -> "ModelConfig":
        if isinstance(self.max_length, int) and not 8 <= self.max_length <= 8192:
            raise ValueError(f"max_length must be 'auto' or between 8 and 8192, got {self.max_length}")
        return self


class TrainConfig(Section):
    method: str = DEFAULT_METHOD
    epochs: float = Field(default=2, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    early_stopping_patience: int = Field(default=2, ge=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    bf16: Literal["auto"] | bool = "auto"
    seed: int = 42
    deterministic: bool = False
    threads: int | None = Field(default=None, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    group_by_length: bool = True  # batches of similar length (less padding); padding itself is always dynamic
    class_weights: Literal["none", "balanced"] = "none"
    layerwise_lr_decay: float = Field(default=1.0, gt=0, le=1)  # 1.0 = off; 0.9 = each layer down gets 0.9x the lr
    gradual_unfreezing: bool = False  # full/partial: unfreeze encoder layers top-down, a group per epoch
    unfreeze_layers: int = Field(default=2, ge=0)  # partial: top encoder layers trained with the head
    save_every_s: float = Field(default=60, gt=0)  # checkpoint cadence by wall time ...
    save_steps: int | None = Field(default=None, ge=1)  # ... or every N optimizer steps when set
    distributed: Literal["none", "ddp", "zero2", "zero3"] = "none"
    # the methods' options sections (tuneflow/methods.py says which method reads which)
    lora: LoraOptions = LoraOptions()
    adalora: AdaLoraOptions = AdaLoraOptions()
    qlora: QLoraOptions = QLoraOptions()
    ia3: IA3Options = IA3Options()
    prompt_learning: PromptLearningOptions = PromptLearningOptions()
    adapter: AdapterOptions = AdapterOptions()

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        return method

    @model_validator(mode="after")
    def _unfreezing_applies(self) -> "TrainConfig":
        if self.gradual_unfreezing and not METHODS[self.method].unfreezing:
            unfreezable = ", ".join(name for name, method in METHODS.items() if method.unfreezing)
            raise ValueError(f"gradual_unfreezing applies to methods {unfreezable}, not {self.method!r}")
        return self


class ExportConfig(Section):
    opset: int = Field(default=18, ge=14)
    # ONNX Runtime vs the merged PyTorch model, on the validation texts
    max_abs_logit_diff: float = Field(default=1e-3, gt=0)
    min_argmax_agreement: float = Field(default=0.995, ge=0, le=1)
    # the merged PyTorch model and the ONNX model vs the trained model's own validation logits (saved by train)
    trained_max_abs_logit_diff: float = Field(default=0.05, gt=0)
    trained_min_argmax_agreement: float = Field(default=0.99, ge=0, le=1)
    parity_batch_size: int = Field(default=16, ge=1)
    quantize: Literal["none", "dynamic"] = "none"  # dynamic: also write an int8 model (ONNX Runtime dynamic quantisation)
    int8_min_argmax_agreement: float = Field(default=0.99, ge=0, le=1)  # int8 vs fp32 ONNX on validation, to ship int8
    int8_max_accuracy_drop: float = Field(default=0.005, ge=0, le=1)  # validation accuracy fp32 minus int8, to ship int8


class EvaluateConfig(Section):
    min_accuracy: float = Field(default=0.85, ge=0, le=1)
    min_macro_f1: float = Field(default=0.85, ge=0, le=1)
    bootstrap_resamples: int = Field(default=1000, ge=1000)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    seed: int = Field(default=0, ge=0)  # bootstrap and perturbations
    non_inferiority_margin: float = Field(default=0.03, ge=0, le=1)  # vs the champion: CI lower bound of the macro-F1 difference
    require_beats_baseline: bool = False  # true: the macro-F1 gain over TF-IDF + logistic regression must have its CI above 0
    perturbation_rate: float = Field(default=0.1, gt=0, le=1)  # fraction of eligible words each perturbation edits
    max_flip_rate: float = Field(default=0.1, ge=0, le=1)
    max_accuracy_drop: float = Field(default=0.05, ge=0, le=1)
    min_slice_support: int = Field(default=30, ge=1)  # smaller slices are reported, not gated
    max_slice_f1_gap: float = Field(default=0.1, ge=0, le=1)
    calibration_bins: int = Field(default=15, ge=2)
    max_ece: float = Field(default=0.1, ge=0, le=1)  # reported as a warning, never gating
    max_latency_p95_ms: float = Field(default=100.0, gt=0)
    max_latency_p99_ms: float = Field(default=200.0, gt=0)
    latency_samples: int = Field(default=1000, ge=1000)
    latency_warmup: int = Field(default=50, ge=0)
    throughput_batch_size: int = Field(default=32, ge=1)
    throughput_texts: int = Field(default=512, ge=1)
    pytorch_reference: bool = True  # also profile the PyTorch model on the same texts (the reference ratio)
    threads: int | None = Field(default=None, ge=1)


class PromoteConfig(Section):
    model_name: str = Field(default="tuneflow-bbc-news", min_length=1)
    # a `dvc exp run` registers its model as a challenger only; true lets an experiment move @champion
    champion_from_experiments: bool = False


class Params(Section):
    artifacts: str = "artifacts"
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections (or all): what a stage's output depends on."""
        dumped = self.model_dump(mode="json")
        picked = {name: dumped[name] for name in sections} if sections else dumped
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


class Pipeline(Section):
    description: str = ""
    source: str | None = None
    method: str | None = None
    set: dict[str, Any] = {}
    schedule: str | None = None

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, schedule: str | None) -> str | None:
        if schedule is not None:
            from prefect.client.schemas.schedules import CronSchedule

            try:
                CronSchedule(cron=schedule)
            except ValueError:
                raise ValueError(f"invalid cron schedule {schedule!r} (expected e.g. '0 3 * * 1')") from None
        return schedule

    def overrides(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        if self.source is not None:
            merged["data.source"] = self.source
        if self.method is not None:
            merged["train.method"] = self.method
        merged.update(self.set)
        return merged


class PipelinesFile(Section):
    pipelines: dict[str, Pipeline]


def parse_set(pairs: list[str]) -> dict[str, Any]:
    """`["train.epochs=2", ...]` -> {"train.epochs": 2}; values are YAML scalars."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.epochs=2")
        try:
            overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            overrides[key.strip()] = raw
    return overrides


def _apply(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    """Set `section.key` in the raw tree, walking the schema so an unknown key is named as such."""
    parts = dotted.split(".")
    node, section = tree, Params
    for depth, part in enumerate(parts):
        field = section.model_fields.get(part)
        if field is None:
            raise InputError(f"{origin}: unknown key {dotted!r}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, Section)):
            raise InputError(f"{origin}: unknown key {dotted!r} ({'.'.join(parts[: depth + 1])} is not a section)")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"{origin}: {'.'.join(parts[: depth + 1])} must be a mapping")
        node, section = child, field.annotation


def _describe(error: ValidationError, origin: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key {key!r}"
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    # a check across a section's keys names them in its message; its input is the whole section
    return f"{origin}: invalid value for {key!r}: {message}" + ("" if isinstance(got, dict) else f" (got {got!r})")


def load_params(params_path: str | Path = "params.yaml", *layers: tuple[str, dict[str, Any]]) -> Params:
    """Read params.yaml (defaults if it does not exist), then apply override layers in order.

    Each layer is (origin, {"section.key": value}); the origin names where a bad key came from.
    """
    path = Path(params_path)
    tree: dict[str, Any] = read_yaml(path) if path.exists() else {}
    for origin, overrides in ((str(path), {}), *layers):
        for key, value in overrides.items():
            _apply(tree, key, value, origin)
        try:
            params = Params.model_validate(tree)
        except ValidationError as error:
            raise InputError(_describe(error, origin)) from None
    return params


def load_pipelines(path: str | Path = "pipelines.yaml") -> PipelinesFile:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        return PipelinesFile.model_validate(read_yaml(path))
    except ValidationError as error:
        raise InputError(_describe(error, str(path))) from None


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: {}); anything else is one line naming the file."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a YAML file")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})") from None
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    if not isinstance(tree, dict):
        raise InputError(f"{path}: expected a mapping of sections at the top level")
    return tree


def pipeline_params(
    name: str | None,
    params_path: str | Path = "params.yaml",
    pipelines_path: str | Path = "pipelines.yaml",
    *layers: tuple[str, dict[str, Any]],
) -> tuple[str, Params]:
    """params.yaml, then the named pipeline's overrides (an explicit overlay: none when `name` is None), then `layers`.

    Returns the run's name (the pipeline, or the params file) and the resolved parameters."""
    if name is None:
        return Path(params_path).name, load_params(params_path, *layers)
    pipelines = load_pipelines(pipelines_path)
    if name not in pipelines.pipelines:
        raise InputError(f"{pipelines_path}: unknown pipeline {name!r} (--pipeline); defined: {', '.join(pipelines.pipelines)}")
    pipeline_layer = (f"{pipelines_path} (pipeline {name})", pipelines.pipelines[name].overrides())
    return name, load_params(params_path, pipeline_layer, *layers)

