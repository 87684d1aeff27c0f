"""Stage 6 — promote: register the ONNX model, alias it `challenger`, move `champion` only if the verdict says so.

Promote decides nothing itself: the evaluation verdict (absolute thresholds and the paired comparison with the
champion) is the decision. It refuses a verdict that is not about the ONNX file it would register or about other
test data (registry untouched), or about another champion than the current one (recorded in the history as
`refused`). Then it writes, under the model's registry lock: the version (reused when this exact artifact — ONNX
file, data, params — was registered before; none when it already is the champion), @challenger, @champion, each
alias move with its history entry. A failure at any step leaves @champion where it was, tags the version
`promotion=failed: ...` and ends with one line. A `dvc exp run` registers a challenger only, unless
`promote.champion_from_experiments` is set. Writes decision.json and report.md into artifacts/promotion/."""

from __future__ import annotations

import contextlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneflow import artifacts
from tuneflow.artifacts import content_hash, read_json, write_json
from tuneflow.config import Params
from tuneflow.errors import InputError
from tuneflow.models import base_weights_sha256
from tuneflow.registry import CHALLENGER, CHAMPION, PROMOTION_TAG, Registry, RegistryError, Version, history_entry, redact, safe_key


@dataclass(frozen=True)
class PromoteResult:
    decision: dict[str, Any]
    error: RegistryError | None = None  # a registry write failed: @champion stayed where it was

    def failure(self, published: Path) -> RegistryError | None:
        """Raised by the stage runner once decision.json (which records the failure) is published."""
        return self.error


def decide(verdict: dict[str, Any]) -> tuple[bool, list[str]]:
    """The verdict is the decision: every gating check must pass; the champion check says why it may replace it."""
    failed = [check["reason"] for check in verdict["checks"] if not check["passed"] and check["gating"]]
    if failed:
        return False, ["evaluation gate failed: " + "; ".join(failed)]
    champion = next(check for check in verdict["checks"] if check["name"] == "champion_non_inferiority")
    return True, [f"evaluation gate passed; {champion['reason']}"]


def check_file_custody(verdict: dict[str, Any], verdict_path: Path, onnx_path: Path, data_hash: str) -> str:
    """The verdict must be about this file and this test data; returns the file's sha256."""
    onnx_sha256 = content_hash(onnx_path)
    if onnx_sha256 is None:
        raise InputError(f"{onnx_path}: missing; run `tuneflow export`")
    if verdict.get("onnx_sha256") != onnx_sha256:
        raise InputError(f"{verdict_path}: the verdict is about ONNX file {(verdict.get('onnx_sha256') or 'unknown')[:12]}, "
                         f"{onnx_path} is {onnx_sha256[:12]}; run `tuneflow evaluate` on this export first")
    if verdict.get("data_hash") != data_hash:
        raise InputError(f"{verdict_path}: the verdict is about other test data than the gated splits; run `tuneflow evaluate` first")
    return onnx_sha256


def check_champion_custody(verdict: dict[str, Any], verdict_path: Path, current: Version | None, registry: Registry, name: str) -> None:
    """The verdict must have compared with the live champion; a refusal is recorded in the history (a decision too)."""
    judged = (verdict.get("champion") or {}).get("version")
    now = current.version if current else None
    if judged == now:
        return
    message = (f"{verdict_path}: the verdict compared with champion {f'v{judged}' if judged else 'none'}, but @champion is "
               f"{f'v{now}' if now else 'none'} now; run `tuneflow champion` and `tuneflow evaluate` again")
    registry.append_history(name, history_entry(CHAMPION, now, now, action="refused", reason=message))
    raise InputError(message)


def promote(params: Params, validation_dir: Path, model_dir: Path, export_dir: Path, eval_dir: Path, out_dir: Path,
            run_name: str = "params.yaml", experiment: str | None = None, dvc_lock: dict[str, dict[str, str]] | None = None,
            registry: Registry | None = None) -> PromoteResult:
    """Decide from the verdict, then write: register (or reuse) the version and move the aliases under the model's lock."""
    registry = registry or Registry()
    name = params.promote.model_name
    gated_data = validation_dir / artifacts.GATED_DATA
    verdict_path = eval_dir / artifacts.VERDICT
    verdict, metrics = read_json(verdict_path), read_json(eval_dir / artifacts.METRICS)
    summary = read_json(model_dir / artifacts.TRAIN_SUMMARY)
    card = read_json(gated_data / artifacts.DATA_CARD)
    parity = read_json(export_dir / artifacts.PARITY)
    onnx_path = export_dir / parity.get("onnx_file", artifacts.ONNX_MODEL)
    if not parity.get("passed"):
        raise InputError(f"{export_dir / artifacts.PARITY}: the export failed parity; it is never registered (run `tuneflow export` again)")
    onnx_sha256 = check_file_custody(verdict, verdict_path, onnx_path, card["data_hash"])

    promoted, reasons = decide(verdict)
    if experiment is not None and not params.promote.champion_from_experiments:
        reasons = [f"DVC experiment {experiment}: registered as challenger only (@champion moves from an experiment "
                   f"only with promote.champion_from_experiments=true)"] + reasons
        promoted = False
    tags = {
        "data_hash": card["data_hash"],
        "split": json.dumps(card["split"], sort_keys=True),
        "split_salt": card["split"]["salt"],
        "git_commit": git_commit(),
        "params_hash": params.section_hash(),
        "method": summary["method"],
        "base_model": summary["base_model"],
        "base_model_sha256": base_weights_sha256(summary["base_model"]),
        "onnx_sha256": onnx_sha256,
        "onnx_opset": str(parity.get("opset", params.export.opset)),
        "shipped_file": onnx_path.name,
        "pipeline": run_name,
        # lineage: each stage folder's content hash (what the Prefect cache checks); `registry show` prints them
        "stage_hashes": json.dumps({folder.name: content_hash(folder) for folder in (validation_dir, model_dir, export_dir, eval_dir)}),
        "verdict": "passed" if verdict["passed"] else "failed",
        "verdict_summary": verdict["summary"],
        "test_macro_f1": f"{metrics['macro_f1']:.6f}",
        **({"experiment": experiment} if experiment else {}),
        # under `dvc repro`: the stage output hashes dvc.lock recorded for this run (`dvc checkout` restores them)
        **({"dvc_lock_outs": json.dumps(dvc_lock, sort_keys=True)} if dvc_lock else {}),
    }
    identity = {key: tags[key] for key in ("onnx_sha256", "data_hash", "params_hash")}
    resolved = params.model_dump(mode="json")
    candidate = dict(
        model_name=name,
        onnx_path=onnx_path,
        extra_files=sorted(path for path in (export_dir / artifacts.ASSETS).iterdir() if path.is_file()),
        params=flatten(resolved) | {"pipeline": run_name},
        metrics=run_metrics(metrics, summary, parity, card),
        step_metrics=[(f"train_{key}" if not key.startswith("eval_") else key, entry[key], entry.get("step", 0))
                      for entry in summary["log_history"] for key in ("loss", "eval_loss", "eval_macro_f1", "grad_norm", "learning_rate") if key in entry],
        artifacts=[gated_data / artifacts.DATA_CARD, *(validation_dir / file for file in (artifacts.GATE_REPORT, artifacts.REPORT, artifacts.FIX_DIFF)),
                   model_dir / artifacts.TRAIN_SUMMARY, model_dir / artifacts.LOSS_CURVES, model_dir / artifacts.REPORT,
                   export_dir / artifacts.PARITY, eval_dir],
        resolved_params=resolved,
        tags=tags | {PROMOTION_TAG: "pending"},
    )

    with registry.lock(name):
        current = registry.by_alias(name, CHAMPION)
        check_champion_custody(verdict, verdict_path, current, registry, name)
        if verdict["passed"] and current is not None and current.tags.get("onnx_sha256") == onnx_sha256:
            if current.tags.get(PROMOTION_TAG) == "pending":  # a run was killed after moving @champion: finish its promotion
                complete_interrupted(registry, current, reasons)
            return finish(out_dir, already_champion(current, metrics["macro_f1"], onnx_sha256, registry))
        decision = {"promoted": promoted, "model_name": name, "version": None, "alias": CHAMPION if promoted else CHALLENGER,
                    "previous_champion": current.version if current else None, "reasons": reasons,
                    "candidate_macro_f1": metrics["macro_f1"], "champion_macro_f1": metrics["champion"].get("macro_f1"),
                    "run_id": None, "tracking_uri": redact(registry.uri), "tags": tags}
        try:
            version = registry.find_version(name, identity)
            if version is None:
                version = registry.log_candidate(**candidate)
            else:
                decision["reasons"] = [f"the same artifact (ONNX file, data and params) is v{version.version} already: "
                                       f"reused, nothing registered"] + reasons
                registry.tag_version(version, candidate["tags"])
            decision.update(version=version.version, run_id=version.run_id)
            move_aliases(registry, version, promoted, "; ".join(reasons))
        except RegistryError as error:
            with contextlib.suppress(RegistryError):  # registered, then failed: mark it (the next run reuses it)
                failed = registry.find_version(name, identity)
                if failed is not None:
                    registry.tag_version(failed, {PROMOTION_TAG: f"failed: {error}"[:5000]})
            return finish(out_dir, decision | {"promoted": False, "alias": None, "failed": str(error)}, error)
    return finish(out_dir, decision)


def move_aliases(registry: Registry, version: Version, promoted: bool, reason: str) -> None:
    """@challenger, then @champion if promoted, each with its history entry; on a failure the moves made are reverted."""
    moved: list[dict[str, Any]] = []
    try:
        for alias in (CHALLENGER, CHAMPION) if promoted else (CHALLENGER,):
            moved.append(registry.move_alias(version.name, alias, version.version, reason=reason, run_id=version.run_id))
        registry.tag_version(version, {PROMOTION_TAG: "done"})
    except RegistryError as error:
        for entry in reversed(moved):
            with contextlib.suppress(RegistryError):
                registry.move_alias(version.name, entry["alias"], entry["from_version"], run_id=version.run_id, action="revert",
                                    reason=f"promotion of v{version.version} failed: {error}")
        raise


def complete_interrupted(registry: Registry, version: Version, reasons: list[str]) -> None:
    """@champion was moved to `version` but the run ended before its history entry or `done` tag: write what is missing."""
    moves = [entry for entry in registry.history(version.name) if entry["alias"] == CHAMPION]
    last = moves[-1]["to_version"] if moves else None
    if last != version.version:
        registry.append_history(version.name, history_entry(CHAMPION, last, version.version, action="promote", run_id=version.run_id,
                                                            reason="; ".join(["completes a promotion a killed run left unrecorded"] + reasons)))
    registry.tag_version(version, {PROMOTION_TAG: "done"})


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


def finish(out_dir: Path, decision: dict[str, Any], error: RegistryError | None = None) -> PromoteResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / artifacts.DECISION, decision)
    (out_dir / artifacts.REPORT).write_text(render_report(decision), encoding="utf-8")
    return PromoteResult(decision, error)


def render_report(decision: dict[str, Any]) -> str:
    reasons = "\n".join(f"- {reason}" for reason in decision["reasons"] + ([f"FAILED: {decision['failed']}"] if "failed" in decision else []))
    outcome = "FAILED" if "failed" in decision else "PROMOTED" if decision["promoted"] else "NOT PROMOTED"
    return (f"# Promotion: {outcome}\n\n"
            f"`{decision['model_name']}` v{decision['version']} → @{decision['alias']} "
            f"(previous champion: {decision['previous_champion'] or 'none'})\n\n{reasons}\n")


def run_metrics(metrics: dict[str, Any], summary: dict[str, Any], parity: dict[str, Any], card: dict[str, Any]) -> dict[str, float]:
    latency, intervals = metrics["latency_ms"], metrics["intervals"]
    values = {
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_macro_f1_ci_low": intervals["macro_f1"]["low"],
        "test_macro_f1_ci_high": intervals["macro_f1"]["high"],
        "baseline_macro_f1": metrics["baseline"]["macro_f1"],
        "robustness_worst_flip_rate": metrics["robustness"]["worst_flip"]["flip_rate"],
        "calibration_ece": metrics["calibration"]["ece"],
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
    values.update({safe_key("test_f1_", label): row["f1"] for label, row in metrics["per_class"].items() if row["f1"] is not None})
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
