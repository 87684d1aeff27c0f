"""Training throughput on MR, side by side in one run (not a test; `flock`-wrap it on shared machines):

  seeds   — the seeds' recipe: HF Trainer, padding="max_length", max_length=128, fp32, no length grouping
  tuneflow — tuneflow's train stage with its defaults: dynamic padding, length-grouped batches,
             max_length from the token-length percentiles, bf16 only where the hardware has it
  (and the same without length grouping, to show what grouping costs or buys in accuracy)

Same model, method (train.method, default lora), split, epochs, batch size and learning rate. Reports
samples/s, test accuracy, and model FLOP utilisation (useful, non-padding tokens) against this CPU's
measured fp32 (and bf16) matmul peak. Prints a table and appends it to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/train_throughput.py [--sample 5000] [--epochs 1] [--method lora]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MR, merged_test_accuracy, publish  # noqa: E402


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """Sustained GFLOP/s of a square matmul on all threads."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.matmul(a, b)
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e9


def training_flops(model: torch.nn.Module, tokens: int) -> float:
    """Matmul FLOPs of training on `tokens` tokens: forward 2·N·T, input-gradient backward 2·N·T, weight
    gradients 2·N_trainable·T (N: non-embedding weights; attention scores ignored, small at these lengths)."""
    weights = [(name, p) for name, p in model.named_parameters() if p.ndim > 1 and "embeddings" not in name]
    total = sum(p.numel() for _, p in weights)
    trainable = sum(p.numel() for _, p in weights if p.requires_grad)
    return (4 * total + 2 * trainable) * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(MR))
    parser.add_argument("--sample", type=int, default=None, help="keep at most N rows (stratified) before splitting")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--method", default="lora")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from pipeline.runner import run_stage
    from pipeline.table import STAGES
    from tasks.train import use_bf16
    from tuneflow import artifacts
    from tuneflow.artifacts import read_json
    from tuneflow.config import ModelConfig, Params, TrainConfig
    from tuneflow.data import read_splits
    from tuneflow.methods import METHODS, RunInfo
    from tuneflow.models import load_classifier, load_tokenizer

    peak_fp32, peak_bf16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, seconds=2.0)
    work = Path(tempfile.mkdtemp(prefix="tuneflow-throughput-"))
    model_cfg = ModelConfig()  # built-in MiniLM, max_length auto
    cfg = TrainConfig(method=args.method, epochs=args.epochs)
    params = Params.model_validate({"artifacts": str(work), "data": {"source": args.source, "sample": args.sample},
                                    "model": model_cfg.model_dump(), "train": cfg.model_dump()})
    for stage in ("ingest", "validate"):
        run_stage(STAGES[stage], params)
    data_dir = work / artifacts.VALIDATION / artifacts.GATED_DATA  # the splits the train stage reads
    splits, labels = read_splits(data_dir), read_json(data_dir / artifacts.DATA_CARD)["labels"]
    label_ids = {label: index for index, label in enumerate(labels)}
    tokenizer = load_tokenizer(model_cfg)
    rows = []

    # --- the seeds' recipe ----------------------------------------------------------------------
    def padded(frame):
        encoded = tokenizer(frame["text"].tolist(), truncation=True, padding="max_length", max_length=128)
        return Dataset.from_dict({**encoded, "labels": frame["label"].map(label_ids).tolist()})

    train_set, validation_set, test_set = padded(splits["train"]), padded(splits["validation"]), padded(splits["test"])
    steps = int(np.ceil(len(train_set) / cfg.batch_size) * cfg.epochs)
    model = METHODS[cfg.method].wrap(lambda **kw: load_classifier(model_cfg, labels, **kw), cfg, RunInfo(steps, False))
    trainer = Trainer(model=model, train_dataset=train_set, eval_dataset=validation_set,
                      args=TrainingArguments(output_dir=str(work / "seeds"), num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
                                             per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
                                             weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, eval_strategy="epoch",
                                             save_strategy="no", logging_steps=50, report_to=[], seed=cfg.seed))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    predicted = trainer.predict(test_set).predictions.argmax(-1)
    useful_tokens = int(sum(sum(mask) for mask in train_set["attention_mask"]) * cfg.epochs)
    flops_per_token = training_flops(model, 1)  # every recipe trains the same weights: FLOPs are linear in tokens
    rows.append({"recipe": "seeds (max_length pad 128, fp32)", "samples_per_s": len(train_set) * cfg.epochs / seconds, "seconds": seconds,
                 "accuracy": float((predicted == np.array(test_set["labels"])).mean()), "bf16": False,
                 "flops": flops_per_token * useful_tokens})
    del trainer, model

    # --- tuneflow's train stage: its defaults, then the same without length grouping ------------------
    for name, variant in (("tuneflow defaults", cfg), ("tuneflow defaults, no length grouping", cfg.model_copy(update={"group_by_length": False}))):
        summary = run_stage(STAGES["train"], params.model_copy(update={"train": variant})).summary
        accuracy, _ = merged_test_accuracy(work / artifacts.MODEL, data_dir, model_cfg, summary)
        lengths = [len(ids) for ids in tokenizer(splits["train"]["text"].tolist(), truncation=True, max_length=summary["max_length"])["input_ids"]]
        bf16 = summary["bf16"]
        rows.append({"recipe": f"{name} (dynamic pad, max_length {summary['max_length']}, {'bf16' if bf16 else 'fp32'})",
                     "samples_per_s": summary["train_samples_per_s"], "seconds": summary["train_time_s"],
                     "accuracy": accuracy, "bf16": bf16,
                     "flops": flops_per_token * sum(lengths) * cfg.epochs})

    seeds, ours = rows[0], rows[1]
    lines = [
        "",
        f"## Training throughput: seeds' recipe vs tuneflow defaults ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"MR polarity ({args.source}, sample {args.sample or 'all'}): train {len(train_set)}, test {len(test_set)} rows; "
        f"method {cfg.method}, {cfg.epochs:g} epoch(s), batch {cfg.batch_size}, lr {cfg.learning_rate:g}; "
        f"built-in MiniLM-L6; {torch.get_num_threads()} torch threads on {platform.processor() or platform.machine()}. "
        f"Measured matmul peak: fp32 {peak_fp32:.1f} GFLOP/s, bf16 {peak_bf16:.1f} GFLOP/s "
        f"(bf16 {'enabled: native support' if use_bf16('auto') else 'left off: no native bf16 on this CPU'}).",
        "",
        "| recipe | samples/s | train time (s) | test accuracy | MFU (useful tokens, vs the matmul peak of its dtype) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        mfu = row["flops"] / row["seconds"] / 1e9 / (peak_bf16 if row["bf16"] else peak_fp32)
        lines.append(f"| {row['recipe']} | {row['samples_per_s']:.1f} | {row['seconds']:.0f} | {row['accuracy']:.4f} | {mfu:.1%} |")
    speedup = ours["samples_per_s"] / seeds["samples_per_s"]
    delta = (ours["accuracy"] - seeds["accuracy"]) * 100
    lines += ["", f"Speed-up {speedup:.2f}x (target ≥ 3x: {'met' if speedup >= 3 else 'NOT met'}); accuracy difference "
                  f"{delta:+.2f} pt (target within 0.5 pt: {'met' if abs(delta) <= 0.5 else 'higher, not a loss' if delta > 0 else 'NOT met'}). "
                  f"Without length grouping: {rows[2]['samples_per_s'] / seeds['samples_per_s']:.2f}x, "
                  f"{(rows[2]['accuracy'] - seeds['accuracy']) * 100:+.2f} pt. "
                  f"Samples/s include the per-epoch validation pass in every recipe.", ""]
    publish("\n".join(lines))


if __name__ == "__main__":
    main()
