"""Stage 6 — promote: register the ONNX model, alias it `challenger`, move `champion` only if it earned it.

A candidate whose ONNX file is byte for byte the current champion's (a re-run with nothing changed) is
not registered again: the decision says it already is the champion.
Otherwise the candidate becomes champion when the evaluation verdict passed and its test macro-F1 is not below
the current champion's — re-scored on this run's test split, so the comparison is paired — by more
than `promote.max_f1_drop`. A `dvc exp run` registers a challenger only, unless
`promote.champion_from_experiments` is set. Writes decision.json and report.md into its output folder
(artifacts/promotion/).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneflow import artifacts
from tuneflow.artifacts import content_hash, read_json, write_json
from tuneflow.config import Params
from tuneflow.data import read_splits
from tuneflow.onnx_runtime import OnnxClassifier
from tuneflow.registry import CHALLENGER, CHAMPION, Registry, Version, redact, temporary_dir
from tuneflow.scoring import classification_metrics


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
    reasons = [check["reason"] for check in verdict["checks"] if not check["passed"] and check["gating"]]
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


def score_champion(registry: Registry, current: Version | None, labels: list[str], texts: list[str], truth: list[str]) -> ChampionScore | None:
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


def promote(params: Params, validation_dir: Path, model_dir: Path, export_dir: Path, eval_dir: Path, out_dir: Path,
            run_name: str = "params.yaml", experiment: str | None = None, registry: Registry | None = None) -> PromoteResult:
    registry = registry or Registry()
    name = params.promote.model_name
    gated_data = validation_dir / artifacts.GATED_DATA
    verdict = read_json(eval_dir / artifacts.VERDICT)
    metrics = read_json(eval_dir / artifacts.METRICS)
    summary = read_json(model_dir / artifacts.TRAIN_SUMMARY)
    card = read_json(gated_data / artifacts.DATA_CARD)
    parity = read_json(export_dir / artifacts.PARITY)
    test = read_splits(gated_data)["test"]
    onnx_sha256 = content_hash(export_dir / artifacts.ONNX_MODEL)
    current = registry.by_alias(name, CHAMPION)
    if verdict["passed"] and current is not None and current.tags.get("onnx_sha256") == onnx_sha256:
        return finish(out_dir, already_champion(current, metrics["macro_f1"], onnx_sha256, registry))

    champion = score_champion(registry, current, summary["labels"], test["text"].tolist(), test["label"].tolist())
    promoted, reasons = decide(verdict, metrics["macro_f1"], champion, params.promote.max_f1_drop)
    if experiment is not None and not params.promote.champion_from_experiments:
        reasons = [f"DVC experiment {experiment}: registered as challenger only (@champion moves from an experiment "
                   f"only with promote.champion_from_experiments=true)"] + reasons
        promoted = False

    tags = {
        "data_hash": card["data_hash"],
        "git_commit": git_commit(),
        "method": summary["method"],
        "base_model": summary["base_model"],
        "params_hash": params.section_hash(),
        "pipeline": run_name,
        "verdict": "passed" if verdict["passed"] else "failed",
        "test_macro_f1": f"{metrics['macro_f1']:.6f}",
        "onnx_sha256": onnx_sha256,
        **({"experiment": experiment} if experiment else {}),
    }
    resolved = params.model_dump(mode="json")
    version, run_id = registry.log_candidate(
        model_name=name,
        onnx_path=export_dir / artifacts.ONNX_MODEL,
        extra_files=sorted(path for path in (export_dir / artifacts.ASSETS).iterdir() if path.is_file()),
        params=flatten(resolved) | {"pipeline": run_name},
        metrics=run_metrics(metrics, summary, parity, card),
        step_metrics=[(f"train_{key}" if not key.startswith("eval_") else key, entry[key], entry.get("step", 0))
                      for entry in summary["log_history"] for key in ("loss", "eval_loss", "eval_macro_f1", "grad_norm", "learning_rate") if key in entry],
        artifacts=[gated_data / artifacts.DATA_CARD, *(validation_dir / file for file in (artifacts.GATE_REPORT, artifacts.REPORT, artifacts.FIX_DIFF)),
                   model_dir / artifacts.TRAIN_SUMMARY, model_dir / artifacts.LOSS_CURVES, model_dir / artifacts.REPORT,
                   export_dir / artifacts.PARITY, eval_dir],
        resolved_params=resolved,
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
        "tracking_uri": redact(registry.uri),
        "tags": tags,
    }
    return finish(out_dir, decision)


def already_champion(current: Version, macro_f1: float, onnx_sha256: str, registry: Registry) -> dict[str, Any]:
    return {
        "promoted": False,
        "model_name": current.name,
        "version": current.version,
        "alias": CHAMPION,
        "previous_champion": current.version,
        "reasons": [f"unchanged: this ONNX model (sha256 {onnx_sha256[:12]}) already is champion v{current.version}; nothing registered"],
        "candidate_macro_f1": macro_f1,
        "champion_macro_f1": macro_f1,  # the same model on the same test split
        "run_id": current.run_id,
        "tracking_uri": redact(registry.uri),
        "tags": current.tags,
    }


def finish(out_dir: Path, decision: dict[str, Any]) -> PromoteResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / artifacts.DECISION, decision)
    (out_dir / artifacts.REPORT).write_text(render_report(decision), encoding="utf-8")
    return PromoteResult(decision)


def render_report(decision: dict[str, Any]) -> str:
    reasons = "\n".join(f"- {reason}" for reason in decision["reasons"])
    return (f"# Promotion: {'PROMOTED' if decision['promoted'] else 'NOT PROMOTED'}\n\n"
            f"`{decision['model_name']}` v{decision['version']} → @{decision['alias']} "
            f"(previous champion: {decision['previous_champion'] or 'none'})\n\n{reasons}\n")


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
