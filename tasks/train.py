"""Stage 3 — train: HF Trainer over the method table, dynamic padding, early stopping on validation.

Writes into its output folder (artifacts/model/) the method's weights, the tokenizer, train_summary.json,
report.md and loss_curves.png. Checkpoints go to <work>/checkpoints/<run key>/, where the run key hashes the model and
train config and the data; re-running the same command after an interruption resumes from the last one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tuneflow import artifacts, progress
from tuneflow.artifacts import read_json, write_json
from tuneflow.config import ModelConfig, TrainConfig
from tuneflow.data import read_splits
from tuneflow.errors import DataGateFailed, InputError, StageFailed
from tuneflow.methods import METHODS, Method, RunInfo
from tuneflow.models import load_classifier, load_tokenizer, resolve_base
from tuneflow.windows import LongText, SampledWindows, Windower, epoch_draw

MAX_LENGTH_MULTIPLE = 8


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    summary: dict[str, Any]
    publish: bool = True  # False on the non-main ranks of a distributed run: rank 0 publishes the model


def cpu_supports_bf16() -> bool:
    """bf16 only pays off with native bf16 matmul (AVX512-BF16/AMX); elsewhere it is ~50x slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def use_bf16(setting: str | bool) -> bool:
    import torch

    if setting != "auto":
        return bool(setting)
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16()


def position_limit(model_cfg: ModelConfig, tokenizer) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_base(model_cfg.base), trust_remote_code=model_cfg.trust_remote_code)
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    return min(limit for limit in limits if limit and limit < 1_000_000)


def choose_max_length(lengths: list[int], percentile: float, limit: int) -> int:
    """The `percentile` of the token lengths, rounded up to a multiple of 8, within [8, limit]."""
    wanted = int(math.ceil(np.percentile(lengths, percentile) / MAX_LENGTH_MULTIPLE) * MAX_LENGTH_MULTIPLE)
    return max(MAX_LENGTH_MULTIPLE, min(wanted, limit))


def run_key(model_cfg: ModelConfig, cfg: TrainConfig, data_hash: str) -> str:
    """Checkpoints are only resumed by the same config on the same data."""
    payload = {"model": model_cfg.model_dump(mode="json"), "train": cfg.model_dump(mode="json"), "data": data_hash}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing (trainer_state.json is written last); a
    half-written one from a kill during saving is removed."""
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[-1]))
    for checkpoint in reversed(checkpoints):
        if complete_state(checkpoint / "trainer_state.json"):
            return checkpoint
        shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def complete_state(state_file: Path) -> bool:
    """trainer_state.json exists and parses (a kill during its write leaves a truncated file)."""
    try:
        return isinstance(read_json(state_file), dict)
    except (OSError, ValueError):
        return False


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started
    from a big parent (the compare flow) would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def weight_files_ok(model_dir: Path) -> dict[str, int]:
    """Every saved weight file holds non-empty tensors (ZeRO-3 + PEFT is known to save empty adapters)."""
    from safetensors import safe_open

    sizes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            elements = sum(int(np.prod(weights.get_slice(key).get_shape())) for key in weights.keys())
        if elements == 0:
            raise StageFailed(f"{path}: saved weights are empty (ZeRO-3 without gathering on save?); not publishing them")
        sizes[path.name] = path.stat().st_size
    if not sizes:
        raise StageFailed(f"{model_dir}: no safetensors weights were saved")
    return sizes


def require_gate_passed(gate_report: Path, gated_data: Path, ingest_card: Path) -> None:
    """Fail closed: no training on data the gate has not passed (or on data changed since)."""
    if not gate_report.exists():
        raise InputError(f"{gate_report}: missing; run `tuneflow validate` before training")
    report = read_json(gate_report)
    if not report["passed"]:
        raise DataGateFailed(f"{gate_report.with_name(artifacts.REPORT)}: the data gate failed for this data; training refused")
    gated_card = gated_data / artifacts.DATA_CARD
    if not gated_card.exists():
        raise InputError(f"{gated_card}: missing; run `tuneflow validate` before training")
    gated_hash = read_json(gated_card)["data_hash"]
    current = read_json(ingest_card)["data_hash"] if ingest_card.exists() else None
    if report["data_hash"] != gated_hash:
        raise InputError(f"{gate_report}: validated data {report['data_hash'][:12]} is not the gated data {gated_hash[:12]}; run `tuneflow validate`")
    if current is not None and report.get("source_data_hash") != current:
        raise InputError(f"{gate_report}: validated data is not the current ingest data {current[:12]}; run `tuneflow validate`")


def train(gated_data: Path, gate_report: Path, ingest_card: Path, model_cfg: ModelConfig, cfg: TrainConfig,
          out_dir: Path, work_dir: Path, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune `model_cfg.base` with `cfg.method` on the train split; keep the best validation epoch.

    `callbacks`: extra transformers TrainerCallbacks from a driver (`tuneflow tune` reports each evaluation to its
    trial). The test split is not read here. The steps: check the gate, encode the splits, build the model, resume or
    start, train, summarise."""
    import torch
    from transformers import set_seed

    from tuneflow import distributed
    from tuneflow.trained import texts_hash, write_logits
    from tuneflow.training import class_weighting, majority_macro_f1

    require_gate_passed(gate_report, gated_data, ingest_card)
    if cfg.distributed != "none" and not distributed.launched():
        raise InputError(f"train.distributed={cfg.distributed} needs a launcher: {distributed.launch_command(cfg.distributed)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    method = METHODS[cfg.method]
    card = read_json(gated_data / artifacts.DATA_CARD)
    labels = card["labels"]
    tokenizer = load_tokenizer(model_cfg)
    splits = read_splits(gated_data, ("train", "validation"))

    max_length, max_length_source = pick_max_length(model_cfg, cfg, method, tokenizer, splits["train"]["text"].tolist())
    long_text = LongText.of(model_cfg, max_length)
    label_ids = {label: index for index, label in enumerate(labels)}
    train_set = training_rows(tokenizer, splits["train"], label_ids, long_text, cfg.seed)
    validation_set = encode(tokenizer, splits["validation"], label_ids, max_length, long_text)
    if isinstance(train_set, SampledWindows):  # a window per text, drawn afresh as each epoch begins
        callbacks = [*callbacks, epoch_draw(train_set)]
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / (cfg.batch_size * world)) / cfg.gradient_accumulation_steps)
    bf16 = use_bf16(cfg.bf16)
    weighting = class_weighting(cfg.class_weights, [row["labels"] for row in train_set], cfg.class_weights_auto_ratio)
    if cfg.class_weights == "auto":
        progress.say(f"[tuneflow] train.class_weights auto: {weighting['reason']}")
    majority = majority_macro_f1([row["labels"] for row in validation_set])
    stuck_at_or_below = majority + cfg.collapse_margin

    def attempt(attempt_cfg: TrainConfig) -> Attempt:
        set_seed(attempt_cfg.seed, deterministic=attempt_cfg.deterministic)
        return fit(method, model_cfg, attempt_cfg, tokenizer, train_set, validation_set, labels, max_length,
                   math.ceil(steps_per_epoch * attempt_cfg.epochs), bf16, card["data_hash"], work_dir, callbacks,
                   stuck_at_or_below)

    # learned no more than the majority answer (a collapse, or the plateau next to one): once more from the base weights
    # with another seed and an epoch more (a run killed during the restart re-runs its first attempt, then the restart)
    current, first = attempt(cfg), None
    if cfg.collapse_restart and current.record["stuck"]:
        first = current.record
        restart_cfg = cfg.model_copy(update={"seed": cfg.seed + 1, "epochs": cfg.epochs + cfg.collapse_restart_extra_epochs,
                                             "learning_rate": cfg.learning_rate * cfg.collapse_restart_lr_factor})
        progress.say(f"[tuneflow] train: collapse: kept validation macro-F1 {first['kept_macro_f1']:.4f} is within "
                     f"{cfg.collapse_margin:g} of the majority-class answer's {majority:.4f}; restarting once from the base "
                     f"weights with seed {restart_cfg.seed}, {restart_cfg.epochs:g} epochs, learning rate "
                     f"{restart_cfg.learning_rate:.3g}")
        del current
        current = attempt(restart_cfg)
    trainer, key, run_dir, resumed, train_seconds = current.trainer, current.key, current.run_dir, current.resumed, current.seconds
    attempts = [*([first] if first else []), current.record]
    final = run_dir / "final"
    if method.save is None:
        trainer.save_model(str(final))  # on every rank: ZeRO-3 gathers the shards here
    elif trainer.is_world_process_zero():
        method.save(trainer.model, final)
    validation_texts = splits["validation"]["text"].tolist()
    # on every rank: under ZeRO-3 each forward gathers the sharded weights from all of them
    validation_logits = trained_logits(trainer, tokenizer, validation_texts, long_text, cfg.eval_batch_size)
    if not trainer.is_world_process_zero():
        return TrainResult(out_dir, {}, publish=False)

    summary = summarise(trainer, method, model_cfg, current.cfg, labels, final, key, resumed) | {
        "max_length": max_length, "max_length_source": max_length_source,
        "train_time_s": round(sum(record["train_time_s"] for record in attempts), 2),
        "train_samples_per_s": round(len(train_set) * (trainer.state.epoch - resumed["epoch"]) / train_seconds, 2),
        "learning_rate": current.cfg.learning_rate, "class_weights": weighting, "attempts": attempts,
        "collapse_restart": {"enabled": cfg.collapse_restart, "fired": first is not None, "margin": cfg.collapse_margin,
                             "majority_macro_f1": majority, "stuck_at_or_below": stuck_at_or_below},
        "planned_optimizer_steps": current.total_steps, "bf16": bf16, "world_size": world,
        "train_rows": len(train_set), "validation_rows": len(validation_texts), "validation_windows": len(validation_set),
        "long_text": long_text.record(),
        "served_validation_macro_f1": served_macro_f1(validation_logits, splits["validation"], label_ids),
        "validation_logits": {"file": artifacts.VALIDATION_LOGITS, "shape": list(validation_logits.shape),
                              "texts_sha256": texts_hash(validation_texts)}}
    if first is not None and current.record["stuck"]:
        summary["diagnostics"]["warnings"].append(f"the collapse restart (seed {current.cfg.seed}, {current.cfg.epochs:g} "
                                                  "epochs) learned no more than the majority answer either (it runs once)")
    for warning in summary["diagnostics"]["warnings"]:
        progress.say(f"[tuneflow] warning: {warning}")
    from tuneflow.training import plot_curves, write_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in final.iterdir():
        shutil.copy2(path, out_dir / path.name)
    tokenizer.save_pretrained(out_dir)
    write_logits(out_dir / artifacts.VALIDATION_LOGITS, validation_logits)
    plot_curves(summary["log_history"], out_dir / artifacts.LOSS_CURVES)
    write_curves(summary["log_history"], out_dir / artifacts.TRAIN_CURVE, out_dir / artifacts.VALIDATION_CURVE)
    (out_dir / artifacts.REPORT).write_text(render_report(summary), encoding="utf-8")
    write_json(out_dir / artifacts.TRAIN_SUMMARY, summary)
    shutil.rmtree(run_dir, ignore_errors=True)
    return TrainResult(out_dir, summary)


@dataclass
class Attempt:
    """One training run of train(): the Trainer after it, its config, planned steps, checkpoint key and folder, its time
    and its record (train_summary.json's `attempts` entry)."""

    trainer: Any
    cfg: TrainConfig
    total_steps: int
    key: str
    run_dir: Path
    resumed: dict[str, Any]
    seconds: float
    record: dict[str, Any]


def fit(method: Method, model_cfg: ModelConfig, cfg: TrainConfig, tokenizer, train_set, validation_set, labels: list[str],
        max_length: int, total_steps: int, bf16: bool, data_hash: str, work_dir: Path, callbacks: Sequence[Any],
        stuck_at_or_below: float) -> Attempt:
    """Build the model from the base weights and train it (resuming this config's checkpoint if there is one)."""
    from tuneflow.training import attempt_record

    model = build_model(method, model_cfg, cfg, labels, RunInfo(total_steps, bf16), max_length)
    key = run_key(model_cfg, cfg, data_hash)
    run_dir, resume = checkpoint_to_resume(work_dir / artifacts.CHECKPOINTS, key, method)
    trainer = build_trainer(model, method, cfg, tokenizer, train_set, validation_set, labels, run_dir, total_steps, bf16,
                            callbacks)
    resumed = read_json(resume / "trainer_state.json") if resume else {"global_step": None, "epoch": 0}
    if resume is not None:
        progress.say(f"[tuneflow] resuming from checkpoint {resume} (step {resumed['global_step']} of {total_steps})")
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started
    record = attempt_record(trainer.state.log_history, cfg.learning_rate, cfg.seed, cfg.epochs, seconds, len(labels),
                            method.reload_checkpoints, stuck_at_or_below)
    return Attempt(trainer, cfg, total_steps, key, run_dir, resumed, seconds, record)


def trained_logits(trainer, tokenizer, texts: list[str], long_text: LongText, batch_size: int) -> np.ndarray:
    """The validation logits of the model as it ends training (the weights that were saved), tokenised as served.

    Without the mixed-precision autocast the Trainer put around forward: export runs the saved weights in fp32, so
    bf16 rounding would only blur the comparison (QLoRA's 4-bit layers still compute in their own dtype)."""
    from tuneflow.trained import predict_logits

    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return predict_logits(model, tokenizer, texts, long_text, batch_size)


def served_macro_f1(logits: np.ndarray, frame, label_ids: dict[str, int]) -> float:
    """Validation macro-F1 of the saved model with its inputs as served (under chunk: window logits averaged per text;
    the Trainer's per-epoch evaluation scores each window on its own)."""
    from sklearn.metrics import f1_score

    return float(f1_score(frame["label"].map(label_ids).to_numpy(), logits.argmax(axis=-1), average="macro"))


def pick_max_length(model_cfg: ModelConfig, cfg: TrainConfig, method: Method, tokenizer, texts: list[str]) -> tuple[int, str]:
    """`model.max_length`, or the chosen percentile of the training texts' token lengths; within the model's positions."""
    virtual = method.virtual_tokens(cfg)
    limit = position_limit(model_cfg, tokenizer) - virtual
    if isinstance(model_cfg.max_length, int):
        if not virtual and model_cfg.max_length > limit:  # prompt methods explain their own limit (export_blocker)
            raise InputError(f"model.max_length {model_cfg.max_length} exceeds {model_cfg.base}'s limit of {limit} tokens")
        return model_cfg.max_length, "model.max_length"
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    max_length = choose_max_length(lengths, model_cfg.max_length_percentile, limit)
    source = f"P{model_cfg.max_length_percentile:g} of {len(lengths)} training texts' token lengths (limit {limit})"
    progress.say(f"[tuneflow] max_length {max_length}: {source}")
    return max_length, source


def encode(tokenizer, frame, label_ids: dict[str, int], max_length: int, long_text: LongText | None = None) -> list[dict[str, Any]]:
    """One dict of token ids per row (under `model.long_text` chunk: per window, each with its row's label). A plain
    list, not a `datasets.Dataset`: its fingerprinting runs dill, whose bytecode dumps end up in Prefect's task logs
    (log_prints)."""
    if long_text is None or long_text.policy == "truncate":
        encoded = tokenizer(frame["text"].tolist(), truncation=True, max_length=max_length)
        return [{**{key: values[row] for key, values in encoded.items()}, "labels": label}
                for row, label in enumerate(frame["label"].map(label_ids))]
    windows, owner = Windower(tokenizer, long_text).windows(frame["text"].tolist())
    labels = frame["label"].map(label_ids).tolist()
    return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[text]} for ids, text in zip(windows, owner)]


def training_rows(tokenizer, frame, label_ids: dict[str, int], long_text: LongText, seed: int):
    """The training split as the Trainer takes it: encode's rows, or under chunk one window per text per epoch."""
    if long_text.policy != "chunk":
        return encode(tokenizer, frame, label_ids, long_text.max_length, long_text)
    windows, owner = Windower(tokenizer, long_text).windows(frame["text"].tolist())
    return SampledWindows(windows, owner, frame["label"].map(label_ids).tolist(), seed)


def build_model(method: Method, model_cfg: ModelConfig, cfg: TrainConfig, labels: list[str], run: RunInfo, max_length: int):
    from peft.utils.error import NoMatchingPeftModuleError

    try:
        model = method.wrap(lambda **kwargs: load_classifier(model_cfg, labels, **kwargs), cfg, run)
    except NoMatchingPeftModuleError:
        sections = [option for option in method.options if hasattr(getattr(cfg, option, None), "target_modules")]
        keys = ", ".join(f"train.{section}.target_modules" for section in sections)
        wanted = [getattr(cfg, section).target_modules for section in sections]
        raise InputError(f"{keys}: no module of {model_cfg.base!r} matches {', '.join(map(repr, wanted))}") from None
    blocker = method.export_blocker(model, cfg, max_length)
    if blocker:
        raise InputError(f"train.method={cfg.method}: the trained model could not be exported: {blocker}")
    return model


def checkpoint_to_resume(checkpoints_root: Path, key: str, method: Method) -> tuple[Path, Path | None]:
    """This run's checkpoint folder and its last complete checkpoint; other runs' checkpoints are removed."""
    run_dir = checkpoints_root / key
    for stale in checkpoints_root.glob("*"):
        if stale != run_dir:
            shutil.rmtree(stale, ignore_errors=True)
    resume = last_complete_checkpoint(run_dir) if run_dir.exists() else None
    if resume is not None and not method.reload_checkpoints:
        progress.say(f"[tuneflow] train.method={method.name} cannot resume from a checkpoint; starting over")
        shutil.rmtree(run_dir, ignore_errors=True)
        resume = None
    return run_dir, resume


def build_trainer(model, method: Method, cfg: TrainConfig, tokenizer, train_set, validation_set, labels: list[str],
                  run_dir: Path, total_steps: int, bf16: bool, extra_callbacks: Sequence[Any] = ()):
    """The HF Trainer with the method's callbacks, the driver's, and the training practices the config switches on."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments

    from tuneflow import distributed
    from tuneflow.training import (CheckpointCadence, GradualUnfreezing, ProgressLines, balanced_class_weights,
                                   class_weighting, layerwise_param_groups, unfreezing_groups, weighted_loss)

    callbacks: list[Any] = [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience),
                            CheckpointCadence(cfg.save_every_s, cfg.save_steps), *method.callbacks(), *extra_callbacks]
    optimizer = None
    if cfg.layerwise_lr_decay < 1.0 or cfg.gradual_unfreezing:
        # built over every parameter that will train, frozen ones included: the Trainer's own optimizer
        # would leave out the layers gradual unfreezing opens later
        optimizer = torch.optim.AdamW(layerwise_param_groups(model, cfg.learning_rate, cfg.layerwise_lr_decay, cfg.weight_decay),
                                      lr=cfg.learning_rate)
    if cfg.gradual_unfreezing:
        callbacks.append(GradualUnfreezing(unfreezing_groups(model), cfg.epochs))
    loss_func = None
    train_labels = [row["labels"] for row in train_set]
    if class_weighting(cfg.class_weights, train_labels, cfg.class_weights_auto_ratio)["applied"] == "balanced":
        loss_func = weighted_loss(balanced_class_weights(train_labels, len(labels)))

    def compute_metrics(prediction) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return {"accuracy": accuracy_score(prediction.label_ids, predicted),
                "macro_f1": f1_score(prediction.label_ids, predicted, average="macro"),
                "predicted_classes": len(np.unique(predicted))}

    deepspeed = distributed.deepspeed_config_path(cfg.distributed)
    if deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise InputError(f"train.distributed={cfg.distributed}: deepspeed is not installed (pip install deepspeed on the GPU machine)")
    args = TrainingArguments(
        output_dir=str(run_dir),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=method.reload_checkpoints,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        group_by_length=cfg.group_by_length,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),  # bf16 on a CPU is only accepted with use_cpu
        seed=cfg.seed,
        data_seed=cfg.seed,
        full_determinism=cfg.deterministic,
        logging_steps=max(1, min(50, total_steps // 50)),
        report_to=[],
        dataloader_num_workers=0,
        deepspeed=str(deepspeed) if deepspeed else None,
        save_safetensors=True,
        disable_tqdm=not sys.stderr.isatty(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=validation_set,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                      compute_metrics=compute_metrics, compute_loss_func=loss_func, optimizers=(optimizer, None),
                      callbacks=callbacks)
    if args.disable_tqdm:  # a log, not a terminal: a line every 30 s and per evaluation instead of every log dict
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressLines())
    return trainer


def summarise(trainer, method: Method, model_cfg: ModelConfig, cfg: TrainConfig, labels: list[str], final: Path,
              key: str, resumed: dict[str, Any]) -> dict[str, Any]:
    """train_summary.json: what was trained, how it went, and what export needs to rebuild it."""
    from tuneflow.training import diagnose

    history = trainer.state.log_history
    evals = [entry for entry in history if "eval_macro_f1" in entry]
    best = max(evals, key=lambda entry: entry["eval_macro_f1"]) if method.reload_checkpoints else evals[-1]  # the epoch kept
    weights = weight_files_ok(final)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    return {
        "method": method.name,
        "export": method.export,
        "export_record": method.export_record(cfg),
        "base_model": model_cfg.base,
        "labels": labels,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "resumed_from_step": resumed["global_step"],
        "epochs_run": trainer.state.epoch,
        "best_epoch": best["epoch"],
        "best_validation_macro_f1": best["eval_macro_f1"],
        "best_validation_accuracy": best["eval_accuracy"],
        "optimizer_steps": trainer.state.global_step,
        "distributed": cfg.distributed,
        "peak_rss_mb": peak_rss_mb(),
        "weights_bytes": sum(weights.values()),
        "weight_files": weights,
        "run_key": key,
        "diagnostics": diagnose(history, classes=len(labels)),
        "log_history": history,
    }


def restart_rows(summary: dict[str, Any]) -> list[str]:
    """The report's rows for the class-weight decision and the collapse restart."""
    rows = []
    weighting = summary.get("class_weights")
    if weighting:
        rows.append(f"| class weights | {weighting['applied']}" + (f" (auto: {weighting['reason']})" if "reason" in weighting else "") + " |")
    restart = summary.get("collapse_restart")
    if restart and restart["fired"]:
        first, kept = summary["attempts"][0], summary["attempts"][-1]
        rows.append(f"| collapse restart | fired: kept validation macro-F1 {first['kept_macro_f1']:.4f} ≤ "
                    f"{restart['stuck_at_or_below']:.4f} (majority-class answer {restart['majority_macro_f1']:.4f} + "
                    f"{restart['margin']:g}) with seed {first['seed']}, {first['epochs']:g} epochs; retrained once from the "
                    f"base weights with seed {kept['seed']}, {kept['epochs']:g} epochs, learning rate {kept['learning_rate']:.3g} "
                    f"→ {kept['kept_macro_f1']:.4f} |")
    elif restart:
        rows.append(f"| collapse restart | {'not needed' if restart['enabled'] else 'off'} (kept validation macro-F1 "
                    f"{summary['attempts'][-1]['kept_macro_f1']:.4f}; stuck at or below {restart['stuck_at_or_below']:.4f}) |")
    return rows


def render_report(summary: dict[str, Any]) -> str:
    diagnostics, grad = summary["diagnostics"], summary["diagnostics"]["grad_norm"]
    lines = [
        f"# Training: {summary['method']} on {summary['base_model']}",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "| item | value |", "|---|---|",
        f"| trainable params | {summary['trainable_params']:,} of {summary['total_params']:,} ({summary['trainable_fraction']:.2%}) |",
        f"| optimizer steps | {summary['optimizer_steps']} (epochs {summary['epochs_run']:g}, best epoch {summary['best_epoch']:g}) |",
        f"| best validation macro-F1 / accuracy | {summary['best_validation_macro_f1']:.4f} / {summary['best_validation_accuracy']:.4f} |",
        f"| train time / throughput | {summary['train_time_s']:.1f} s / {summary['train_samples_per_s']:.1f} samples/s |",
        f"| max_length | {summary['max_length']} ({summary['max_length_source']}) |",
        f"| long texts | {LongText.from_record(summary.get('long_text'), summary['max_length']).describe()} |",
        f"| final train / validation loss | {diagnostics['final_train_loss']} / {diagnostics['final_validation_loss']} |",
        f"| overfitting | {'yes' if diagnostics['overfitting'] else 'no'} |",
        f"| learning rate | {diagnostics['learning_rate']} |",
        *restart_rows(summary),
        f"| gradient norm median / p95 / max | {grad.get('median', float('nan')):.3g} / {grad.get('p95', float('nan')):.3g} / {grad.get('max', float('nan')):.3g} |",
        f"| peak RSS | {summary['peak_rss_mb']:.0f} MB |",
        "",
    ]
    lines += [f"- **warning:** {warning}" for warning in diagnostics["warnings"]] or ["No warnings."]
    return "\n".join(lines) + "\n"
