"""`tuneflow compare`: train several methods on the same split, export and evaluate each, one table.

The data is ingested and gated once; each method then gets its own artifacts root (<artifacts>/compare/<method>)
whose data and validation folders link to the shared ones. Training runs in a fresh `tuneflow train`
process per method so its peak RSS is its own; export and evaluation are the spine's stages, unchanged.
Methods are ranked on the validation split (the best epoch's macro-F1 that train keeps, in train_summary.json); the
test metrics come from each method's evaluation gate and are shown last, for the record: they never order or pick.
Writes <artifacts>/compare/comparison.md and comparison.json and logs one MLflow run (a nested run per method).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.runner import run_stage
from pipeline.table import STAGES
from tuneflow import artifacts, progress
from tuneflow.artifacts import Layout, read_json, write_json
from tuneflow.config import Params, parse_set

RANKED_BY = "best_validation_macro_f1"
COLUMNS = [("rank", "rank"), ("method", "method"), ("learning_rate", "lr"),
           ("best_validation_macro_f1", "validation macro-F1 (ranks)"), ("best_validation_accuracy", "validation accuracy"),
           ("trainable_params", "trainable params"), ("train_time_s", "train time (s)"), ("peak_rss_mb", "peak RSS (MB)"),
           ("weights_mb", "adapter/checkpoint (MB)"), ("parity_max_abs_logit_diff", "ONNX parity max |Δ|"), ("status", "status"),
           ("test_macro_f1", "test macro-F1 (not used to rank)"), ("test_accuracy", "test accuracy")]


def linked_layout(root: Path, shared: Layout, name: str) -> Layout:
    """An artifacts root <root>/<name> whose data and validation folders link to the shared ones (gated once)."""
    layout = Layout(root / name)
    layout.root.mkdir(parents=True, exist_ok=True)
    for name in (artifacts.DATA, artifacts.VALIDATION):
        link = layout.root / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(shared.root / name, layout.root), target_is_directory=True)
    return layout


@task(cache_policy=NO_CACHE, retries=0)
def compare_one(method: str, params: Params, params_file: str, overrides: list[str], root: Path, shared: Layout) -> dict[str, Any]:
    from tuneflow.methods import METHODS

    layout = linked_layout(root, shared, method)
    # each method at its own suggested learning rate (full fine-tuning diverges at LoRA's 1e-3), unless one is given
    learning_rate = params.train.learning_rate if "train.learning_rate" in parse_set(overrides) else METHODS[method].suggested_lr
    command = [sys.executable, "-m", "cli", "--params", params_file, "train",
               *(arg for pair in overrides for arg in ("--set", pair)),
               "--set", f"artifacts={layout.root}", "--set", f"train.method={method}", "--set", f"train.learning_rate={learning_rate}"]
    progress.say(f"[tuneflow] compare: training {method}")
    trained = subprocess.run(command, capture_output=True, text=True)
    if trained.returncode != 0:
        last = (trained.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "learning_rate": learning_rate, "status": f"train failed: {last}"}
    method_params = params.model_copy(update={"artifacts": str(layout.root),
                                              "train": params.train.model_copy(update={"method": method, "learning_rate": learning_rate})})
    try:
        for stage in ("export", "champion", "evaluate"):
            with progress.stage(f"{stage} ({method})"):
                run_stage(STAGES[stage], method_params)
    except Exception as error:  # one method failing export must not hide the others' numbers
        return {"method": method, "status": f"{type(error).__name__}: {error}"}
    summary = read_json(layout.path(artifacts.MODEL) / artifacts.TRAIN_SUMMARY)
    metrics = read_json(layout.path(artifacts.EVAL) / artifacts.METRICS)
    parity = read_json(layout.path(artifacts.EXPORT) / artifacts.PARITY)
    return {
        "method": method,
        "learning_rate": learning_rate,
        "test_macro_f1": metrics["macro_f1"],
        "test_accuracy": metrics["accuracy"],
        "trainable_params": summary["trainable_params"],
        "trainable_fraction": summary["trainable_fraction"],
        "train_time_s": summary["train_time_s"],
        "train_samples_per_s": summary["train_samples_per_s"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "weights_mb": round(summary["weights_bytes"] / 2**20, 3),
        "best_validation_macro_f1": summary["best_validation_macro_f1"],
        "best_validation_accuracy": summary["best_validation_accuracy"],
        "epochs_run": summary["epochs_run"],
        "parity_max_abs_logit_diff": parity["max_abs_logit_diff"],
        "parity_passed": parity["passed"],
        "overfitting": summary["diagnostics"]["overfitting"],
        "status": "ok" if parity["passed"] else "parity failed",
    }


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best validation macro-F1 first; a method that failed (training, export, parity) comes last, unranked."""
    ranked = sorted((row for row in rows if row["status"] == "ok"), key=lambda row: -row[RANKED_BY])
    return [{**row, "rank": place} for place, row in enumerate(ranked, 1)] + [row for row in rows if row["status"] != "ok"]


def render(rows: list[dict[str, Any]], card: dict[str, Any], params: Params) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 0.01 else f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:,}" if isinstance(value, int) else str(value if value is not None else "—")

    counts = card["counts"]
    lines = [f"# Method comparison on {card['source']}", "",
             f"Same split for every method: train {counts['train']}, validation {counts['validation']}, test {counts['test']}; "
             f"{params.train.epochs:g} epochs, batch {params.train.batch_size}, each method at its lr below, "
             f"base {params.model.base}. Ranked on the validation split: each method's best-epoch validation macro-F1. "
             f"The test columns, last, are each method's exported ONNX model on the test split, for the record: "
             f"they do not order or choose anything.", "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    if rows and "rank" in rows[0]:
        best = rows[0]
        lines += ["", f"Chosen on validation: **{best['method']}** (validation macro-F1 {best[RANKED_BY]:.4f}); its test "
                      f"macro-F1 {best['test_macro_f1']:.4f} is the estimate to report for it."]
    return "\n".join(lines) + "\n"


def log_to_mlflow(rows: list[dict[str, Any]], params: Params, out_dir: Path) -> str:
    import mlflow

    from tuneflow.registry import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("tuneflow-compare")
    with mlflow.start_run(run_name="compare " + ",".join(row["method"] for row in rows)) as parent:
        mlflow.log_params({"data.source": params.data.source, "train.epochs": params.train.epochs,
                           "train.learning_rate": params.train.learning_rate, "model.base": params.model.base})
        for name in (artifacts.COMPARISON_MD, artifacts.COMPARISON_JSON):
            mlflow.log_artifact(str(out_dir / name), artifact_path="comparison")
        for row in rows:
            with mlflow.start_run(run_name=row["method"], nested=True):
                mlflow.log_param("train.method", row["method"])
                mlflow.set_tag("status", row["status"])
                mlflow.log_metrics({key: float(value) for key, value in row.items()
                                    if isinstance(value, (int, float)) and not isinstance(value, bool)})
        return parent.info.run_id


@flow(name="tuneflow-compare", log_prints=True)
def compare(params: Params, methods: list[str], params_file: str = "params.yaml", overrides: list[str] | None = None) -> Path:
    shared = Layout(Path(params.artifacts))
    for stage in ("ingest", "validate"):
        with progress.stage(stage):
            run_stage(STAGES[stage], params)
    root = shared.root / artifacts.COMPARE
    rows = rank([compare_one.with_options(name=f"compare-{method}")(method, params, params_file, overrides or [], root, shared)
                 for method in methods])
    markdown = render(rows, read_json(shared.gated_data / artifacts.DATA_CARD), params)
    chosen = rows[0]["method"] if rows and "rank" in rows[0] else None
    write_json(root / artifacts.COMPARISON_JSON, {"methods": methods, "ranked_by": RANKED_BY, "chosen": chosen, "rows": rows})
    (root / artifacts.COMPARISON_MD).write_text(markdown, encoding="utf-8")
    run_id = log_to_mlflow(rows, params, root) if rows else None
    create_markdown_artifact(markdown=markdown, key="method-comparison", description=f"tuneflow compare (MLflow run {run_id})")
    print(markdown)
    return root / artifacts.COMPARISON_MD
