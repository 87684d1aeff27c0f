"""Stage 6 — promote: register the ONNX model, alias it `challenger`, move `champion` only if it earned it.

The candidate becomes champion when the evaluation verdict passed and its test macro-F1 is not below
the current champion's — re-scored on this run's test split, so the comparison is paired — by more
than `promote.max_f1_drop`. Writes artifacts/promotion/decision.json.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.evaluate import classification_metrics
from tasks.ingest import read_splits
from tuneflow.artifacts import Layout, atomic_dir, read_json, write_json
from tuneflow.config import Params
from tuneflow.onnx_runtime import OnnxClassifier
from tuneflow.registry import CHALLENGER, CHAMPION, Registry, temporary_dir


@dataclass(frozen=True)
class ChampionScore:
    version: str
    macro_f1: float | None
    note: str


@dataclass(frozen=True)
class PromoteResult:
    decision: dict[str, Any]


def decide(verdict: dict[str, Any], candidate_f1: float, champion: ChampionScore | None, max_f1_drop: float) -> tuple[bool, list[str]]:
    """Pure promotion rule: the verdict must pass, then non-inferiority against the champion."""
    reasons = [check["reason"] for check in verdict["checks"] if not check["passed"]]
    if reasons:
        return False, ["evaluation gate failed: " + "; ".join(reasons)]
    if champion is None:
        return True, ["first model for this name: evaluation gate passed, promoted on thresholds"]
    if champion.macro_f1 is None:
        return False, [f"cannot compare with champion v{champion.version}: {champion.note}; use a forced promotion to replace it"]
    drop = champion.macro_f1 - candidate_f1
    comparison = (f"candidate macro-F1 {candidate_f1:.4f} vs champion v{champion.version} {champion.macro_f1:.4f} "
                  f"on the same test split (drop {drop:+.4f}, allowed {max_f1_drop})")
    if drop > max_f1_drop:
        return False, [f"worse than champion: {comparison}"]
    return True, [f"gate passed and not worse than champion: {comparison}"]


def score_champion(registry: Registry, name: str, labels: list[str], texts: list[str], truth: list[str]) -> ChampionScore | None:
    current = registry.by_alias(name, CHAMPION)
    if current is None:
        return None
    with temporary_dir() as scratch:
        try:
            champion = OnnxClassifier.from_mlflow_model(registry.download(current, Path(scratch)))
        except Exception as error:  # a broken or foreign artifact must not crash the promotion
            return ChampionScore(current.version, None, f"its artifact could not be loaded ({type(error).__name__})")
        if sorted(champion.labels) != sorted(labels):
            return ChampionScore(current.version, None, f"its label set {champion.labels} differs from {labels}")
        score = classification_metrics(labels, truth, champion.predict(texts))["macro_f1"]
    return ChampionScore(current.version, score, "re-scored on this run's test split")


def promote(layout: Layout, params: Params, out_dir: Path, pipeline: str = "default", registry: Registry | None = None) -> PromoteResult:
    registry = registry or Registry()
    name = params.promote.model_name
    verdict = read_json(layout.eval / "verdict.json")
    metrics = read_json(layout.eval / "metrics.json")
    summary = read_json(layout.model / "train_summary.json")
    card = read_json(layout.gated_data / "data_card.json")
    parity = read_json(layout.export / "parity.json")
    test = read_splits(layout.gated_data)["test"]

    champion = score_champion(registry, name, summary["labels"], test["text"].tolist(), test["label"].tolist())
    promoted, reasons = decide(verdict, metrics["macro_f1"], champion, params.promote.max_f1_drop)

    tags = {
        "data_hash": card["data_hash"],
        "git_commit": git_commit(),
        "method": summary["method"],
        "base_model": summary["base_model"],
        "params_hash": params.section_hash(),
        "pipeline": pipeline,
        "verdict": "passed" if verdict["passed"] else "failed",
        "test_macro_f1": f"{metrics['macro_f1']:.6f}",
    }
    version, run_id = registry.log_candidate(
        model_name=name,
        onnx_path=layout.export / "model.onnx",
        extra_files=sorted(path for path in (layout.export / "assets").iterdir() if path.is_file()),
        params=flatten(params.model_dump(mode="json")) | {"pipeline": pipeline},
        metrics=run_metrics(metrics, summary, parity, card),
        step_metrics=[(f"train_{key}" if not key.startswith("eval_") else key, entry[key], entry.get("step", 0))
                      for entry in summary["log_history"] for key in ("loss", "eval_loss", "eval_macro_f1", "grad_norm", "learning_rate") if key in entry],
        artifacts=[layout.gated_data / "data_card.json", *(layout.validation / name for name in ("report.json", "report.md", "fix_diff.json")), layout.model / "train_summary.json", layout.export / "parity.json", layout.eval]
                  + [path for path in (layout.model / "loss_curves.png", layout.model / "train_report.md") if path.exists()],
        tags=tags,
    )
    registry.set_alias(version, CHALLENGER)
    if promoted:
        registry.set_alias(version, CHAMPION)
    decision = {
        "promoted": promoted,
        "model_name": name,
        "version": version.version,
        "alias": CHAMPION if promoted else CHALLENGER,
        "previous_champion": champion.version if champion else None,
        "reasons": reasons,
        "candidate_macro_f1": metrics["macro_f1"],
        "champion_macro_f1": champion.macro_f1 if champion else None,
        "run_id": run_id,
        "tracking_uri": registry.uri,
        "tags": tags,
    }
    with atomic_dir(out_dir) as staging:
        write_json(staging / "decision.json", decision)
    return PromoteResult(decision)


def run_metrics(metrics: dict[str, Any], summary: dict[str, Any], parity: dict[str, Any], card: dict[str, Any]) -> dict[str, float]:
    latency = metrics["latency_ms"]
    values = {
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "latency_p50_ms": latency["p50"],
        "latency_p95_ms": latency["p95"],
        "latency_p99_ms": latency["p99"],
        "parity_max_abs_logit_diff": parity["max_abs_logit_diff"],
        "parity_argmax_agreement": parity["argmax_agreement"],
        "train_time_s": summary["train_time_s"],
        "trainable_params": summary["trainable_params"],
        "best_validation_macro_f1": summary["best_validation_macro_f1"],
        **{f"train_{key}": summary[key] for key in ("peak_rss_mb", "weights_bytes", "train_samples_per_s") if key in summary},
        **({"train_overfitting": summary["diagnostics"]["overfitting"],
            "train_grad_norm_max": summary["diagnostics"]["grad_norm"].get("max", float("nan"))} if "diagnostics" in summary else {}),
        "rows_train": card["counts"]["train"],
        "rows_validation": card["counts"]["validation"],
        "rows_test": card["counts"]["test"],
        "rows_dropped_duplicates": card["dropped"]["duplicates"],
    }
    values.update({f"test_f1_{label}": row["f1"] for label, row in metrics["per_class"].items()})
    return {key: float(value) for key, value in values.items()}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit
