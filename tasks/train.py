"""Stage 3 — train: HF Trainer over the method table, dynamic padding, early stopping on validation.

Writes artifacts/model/ (safetensors weights or adapter, tokenizer) and train_summary.json.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.ingest import read_splits
from tuneflow.artifacts import atomic_dir, read_json, write_json
from tuneflow.config import ModelConfig, TrainConfig
from tuneflow.methods import METHODS
from tuneflow.models import load_classifier, load_tokenizer


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    summary: dict[str, Any]


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


def train(data_dir: Path, model_cfg: ModelConfig, cfg: TrainConfig, out_dir: Path, work_dir: Path) -> TrainResult:
    """Fine-tune `model_cfg.base` with `cfg.method` on the train split; keep the best validation epoch."""
    import torch
    from datasets import Dataset
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    splits = read_splits(data_dir)
    labels = read_json(data_dir / "data_card.json")["labels"]
    label_ids = {label: index for index, label in enumerate(labels)}
    tokenizer = load_tokenizer(model_cfg)

    def encode(frame):
        dataset = Dataset.from_dict({"text": frame["text"].tolist(), "labels": frame["label"].map(label_ids).tolist()})
        return dataset.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=model_cfg.max_length),
                           batched=True, remove_columns=["text"])

    train_set, validation_set = encode(splits["train"]), encode(splits["validation"])
    method = METHODS[cfg.method]
    model = method.wrap(load_classifier(model_cfg, labels), cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    def compute_metrics(prediction) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=-1)
        return {"accuracy": accuracy_score(prediction.label_ids, predicted),
                "macro_f1": f1_score(prediction.label_ids, predicted, average="macro")}

    checkpoints = work_dir / "checkpoints"
    shutil.rmtree(checkpoints, ignore_errors=True)
    bf16 = use_bf16(cfg.bf16)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        group_by_length=True,
        bf16=bf16,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=10,
        report_to=[],
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=validation_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)],
    )
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    history = trainer.state.log_history
    evals = [entry for entry in history if "eval_macro_f1" in entry]
    best = max(evals, key=lambda entry: entry["eval_macro_f1"])
    summary = {
        "method": cfg.method,
        "base_model": model_cfg.base,
        "labels": labels,
        "max_length": model_cfg.max_length,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "train_time_s": round(train_seconds, 2),
        "train_samples_per_s": round(len(train_set) * trainer.state.epoch / train_seconds, 2),
        "epochs_run": trainer.state.epoch,
        "best_epoch": best["epoch"],
        "best_validation_macro_f1": best["eval_macro_f1"],
        "best_validation_accuracy": best["eval_accuracy"],
        "optimizer_steps": trainer.state.global_step,
        "bf16": bf16,
        "train_rows": len(train_set),
        "validation_rows": len(validation_set),
        "log_history": history,
    }
    with atomic_dir(out_dir) as staging:
        trainer.model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        write_json(staging / "train_summary.json", summary)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return TrainResult(out_dir, summary)
