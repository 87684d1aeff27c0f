"""Stage 5 — evaluate: the gate, measured on the ONNX file that ships and on the test split (read here only).

Quality with bootstrap intervals, calibration, a TF-IDF baseline, robustness under seeded perturbations,
slices, latency and cost (ONNX and the PyTorch reference, each in a fresh process), and a paired comparison
with the registry's champion on the same test rows. Every check has a value, a threshold, whether it gates and
a one-sentence reason. Writes into its output folder (artifacts/eval/) metrics.json, verdict.json, report.md,
robustness.parquet and plots/{confusion_matrix,reliability,latency}.png.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tuneflow import artifacts
from tuneflow.artifacts import content_hash, read_json, write_json
from tuneflow.baseline import baseline_probabilities
from tuneflow.checks import Check, gate_passed
from tuneflow.config import EvaluateConfig, ModelConfig
from tuneflow.data import read_splits
from tuneflow.errors import InputError, first_line
from tuneflow.latency import OnnxTarget, Plan, TorchTarget, profile
from tuneflow.onnx_runtime import OnnxClassifier
from tuneflow.perturb import PERTURBATIONS, perturb
from tuneflow.registry import Registry, Version, temporary_dir
from tuneflow.scoring import Bootstrap, macro_f1_along, quality, quartile_groups, softmax


@dataclass(frozen=True)
class EvaluateResult:
    eval_dir: Path
    metrics: dict[str, Any]
    verdict: dict[str, Any]


@dataclass(frozen=True)
class Scored:
    """The test rows as label indices, the model's predictions and the classes that have test rows."""

    truth: np.ndarray
    predicted: np.ndarray
    present: np.ndarray

    def macro_f1(self, predicted: np.ndarray | None = None) -> float:
        return float(macro_f1_along(self.truth, self.predicted if predicted is None else predicted, self.present))

    def macro_f1_difference(self, other: np.ndarray, bootstrap: Bootstrap) -> dict[str, Any]:
        """This model's macro-F1 minus another's predictions' on the same rows, with its paired interval."""
        def difference(truth, ours, theirs, axis):
            return macro_f1_along(truth, ours, self.present, axis) - macro_f1_along(truth, theirs, self.present, axis)

        return bootstrap.interval(difference, self.truth, self.predicted, other)


def evaluate(export_dir: Path, model_dir: Path, data_dir: Path, champion_dir: Path, model_cfg: ModelConfig,
             cfg: EvaluateConfig, out_dir: Path) -> EvaluateResult:
    parity = read_json(export_dir / artifacts.PARITY)
    if not parity["passed"]:
        raise InputError(f"{export_dir / artifacts.PARITY}: the export failed parity ({', '.join(parity.get('failed', [])) or 'ONNX vs PyTorch'}); "
                         f"evaluate refuses it (its {artifacts.REPORT} lists the worst rows)")
    onnx_path = export_dir / parity.get("onnx_file", artifacts.ONNX_MODEL)
    onnx_sha256 = shipped_file_hash(onnx_path, parity)
    model = load_onnx(onnx_path, export_dir / artifacts.ASSETS, cfg.threads)
    splits = read_splits(data_dir)
    card = read_json(data_dir / artifacts.DATA_CARD)
    test = splits["test"]
    texts, truth = test["text"].tolist(), test["label"].tolist()
    unknown = sorted(set(truth) - set(model.labels))
    if unknown:
        raise InputError(f"{data_dir / artifacts.split_file('test')}: labels {unknown} are not in the model's label set {model.labels}")
    bootstrap = Bootstrap(cfg.bootstrap_resamples, cfg.confidence, cfg.seed)
    probabilities = softmax(model.logits(texts))
    index = {label: position for position, label in enumerate(model.labels)}
    true_index = np.array([index[label] for label in truth])
    scored = Scored(true_index, probabilities.argmax(axis=-1), np.unique(true_index))
    out_dir.mkdir(parents=True, exist_ok=True)

    metrics: dict[str, Any] = quality(model.labels, truth, probabilities, bootstrap, cfg.calibration_bins)
    metrics["baseline"] = baseline_comparison(splits["train"], texts, model.labels, scored, bootstrap)
    metrics["robustness"] = robustness(model, texts, scored, cfg, out_dir / artifacts.PERTURBED)
    metrics["slices"] = slices(model, test, card.get("slice_columns", []), scored, cfg)
    metrics["latency"] = latency(onnx_path, export_dir / artifacts.ASSETS, model_dir, model_cfg, texts, cfg)
    metrics["latency_ms"] = {key: metrics["latency"]["onnx"][key] for key in ("p50", "p95", "p99", "mean", "samples")}
    metrics["champion"] = compare_with_champion(read_json(champion_dir / artifacts.CHAMPION_RECORD), onnx_sha256, card["split"],
                                                model.labels, texts, scored, bootstrap, cfg)
    metrics.update(test_rows=len(texts), onnx_file=onnx_path.name, onnx_sha256=onnx_sha256, split=card["split"])

    checks = gate_checks(metrics, parity, cfg)
    verdict = {
        "passed": gate_passed(checks),
        "onnx_file": onnx_path.name,
        "onnx_sha256": onnx_sha256,
        "split": card["split"],
        "data_hash": card["data_hash"],
        "champion": {key: metrics["champion"].get(key) for key in ("version", "onnx_sha256", "paired")},
        "summary": summary_line(metrics, checks),
        "checks": [check.as_dict() for check in checks],
    }
    timings = {name: profile.pop("timings_ms") for name, profile in metrics["latency"].items() if "timings_ms" in profile}
    write_json(out_dir / artifacts.METRICS, metrics)
    write_json(out_dir / artifacts.VERDICT, verdict)
    plot_confusion(metrics["confusion_matrix"], model.labels, out_dir / artifacts.CONFUSION_MATRIX)
    plot_reliability(metrics["calibration"], out_dir / artifacts.RELIABILITY_DIAGRAM)
    plot_latency(timings, out_dir / artifacts.LATENCY_HISTOGRAM)
    (out_dir / artifacts.REPORT).write_text(render_markdown(metrics, verdict), encoding="utf-8")
    return EvaluateResult(out_dir, metrics, verdict)


# --- chain of custody -----------------------------------------------------------------------------------------

def shipped_file_hash(onnx_path: Path, parity: dict[str, Any]) -> str:
    """The sha256 of the file that ships, which must be the file export's parity check measured."""
    if not onnx_path.is_file():
        raise InputError(f"{onnx_path}: missing; run `tuneflow export`")
    sha256 = content_hash(onnx_path)
    if parity.get("onnx_sha256") != sha256:
        recorded = (parity.get("onnx_sha256") or "none")[:12]
        raise InputError(f"{onnx_path}: sha256 {sha256[:12]} is not the file {artifacts.PARITY} checked ({recorded}); run `tuneflow export`")
    return sha256


def load_onnx(onnx_path: Path, assets_dir: Path, threads: int | None) -> OnnxClassifier:
    try:
        return OnnxClassifier(onnx_path, assets_dir, threads)
    except Exception as error:  # onnxruntime raises its own exception types for a corrupt graph
        raise InputError(f"{onnx_path}: ONNX Runtime cannot load it ({type(error).__name__}: {first_line(error)}); run `tuneflow export`") from None


# --- the measurements -----------------------------------------------------------------------------------------

def baseline_comparison(train: pd.DataFrame, texts: list[str], labels: list[str], scored: Scored, bootstrap: Bootstrap) -> dict[str, Any]:
    probabilities = baseline_probabilities(train["text"].tolist(), train["label"].tolist(), texts, labels)
    predicted = probabilities.argmax(axis=-1)
    difference = scored.macro_f1_difference(predicted, bootstrap)
    return {"model": "TF-IDF word 1-2-grams + char_wb 1-3-grams, logistic regression, fit on train", "macro_f1": scored.macro_f1(predicted),
            "accuracy": float((predicted == scored.truth).mean()), "macro_f1_difference": difference}


def robustness(model: OnnxClassifier, texts: list[str], scored: Scored, cfg: EvaluateConfig, store: Path) -> dict[str, Any]:
    """Accuracy under each seeded perturbation, its drop from clean and the share of predictions it flips.

    Only perturbed texts whose model input ids differ from the clean text's are run through the model (an uncased
    tokenizer makes case changes and extra spaces no-ops); the rest keep the clean prediction, which is exact."""
    clean_accuracy = float((scored.predicted == scored.truth).mean())
    clean_ids = model.token_ids(texts)
    results, stored = {}, []
    for name in PERTURBATIONS:
        perturbed = perturb(texts, name, cfg.perturbation_rate, cfg.seed)
        changed = [row for row, ids in enumerate(model.token_ids(perturbed)) if ids != clean_ids[row]]
        predicted = scored.predicted.copy()
        if changed:
            predicted[changed] = model.logits([perturbed[row] for row in changed]).argmax(axis=-1)
        accuracy = float((predicted == scored.truth).mean())
        results[name] = {"accuracy": accuracy, "accuracy_drop": clean_accuracy - accuracy,
                         "flip_rate": float((predicted != scored.predicted).mean()),
                         "texts_changed": int(sum(a != b for a, b in zip(perturbed, texts))), "inputs_changed": len(changed)}
        stored.append(pd.DataFrame({"row": range(len(texts)), "perturbation": name, "text": perturbed,
                                    "predicted": [model.labels[i] for i in predicted]}))
    pd.concat(stored, ignore_index=True).to_parquet(store, index=False)
    worst_flip = max(results, key=lambda name: results[name]["flip_rate"])
    worst_drop = max(results, key=lambda name: results[name]["accuracy_drop"])
    return {"rate": cfg.perturbation_rate, "seed": cfg.seed, "clean_accuracy": clean_accuracy, "perturbations": results,
            "worst_flip": {"perturbation": worst_flip, **results[worst_flip]},
            "worst_drop": {"perturbation": worst_drop, **results[worst_drop]}}


def slices(model: OnnxClassifier, test: pd.DataFrame, slice_columns: list[str], scored: Scored, cfg: EvaluateConfig) -> dict[str, Any]:
    """Accuracy and macro-F1 per token-length quartile and per value of each `data.slice_columns` column."""
    tokens = np.array([len(ids) for ids in model.tokenizer(test["text"].tolist(), truncation=False)["input_ids"]])
    groups = quartile_groups(tokens, "tokens")
    for column in slice_columns:
        groups.update({f"{column}={value}": (test[column] == value).to_numpy() for value in sorted(test[column].unique())})
    overall = scored.macro_f1()
    rows = []
    for name, members in groups.items():
        if not members.any():
            continue
        truth, predicted = scored.truth[members], scored.predicted[members]
        macro_f1 = float(macro_f1_along(truth, predicted, np.unique(truth)))
        rows.append({"slice": name, "support": int(members.sum()), "accuracy": float((truth == predicted).mean()),
                     "macro_f1": macro_f1, "f1_gap": overall - macro_f1, "gated": int(members.sum()) >= cfg.min_slice_support})
    gated = [row for row in rows if row["gated"]]
    return {"min_support": cfg.min_slice_support, "slices": rows, "worst": max(gated, key=lambda row: row["f1_gap"]) if gated else None}


def latency(onnx_path: Path, assets_dir: Path, model_dir: Path, model_cfg: ModelConfig, texts: list[str], cfg: EvaluateConfig) -> dict[str, Any]:
    """The shipped file's profile; the fp32 file's too when int8 ships (either could); PyTorch's as the reference."""
    plan = Plan(cfg.latency_samples, cfg.latency_warmup, cfg.throughput_batch_size, cfg.throughput_texts, cfg.threads)
    onnx = profile(OnnxTarget(onnx_path, assets_dir), texts, plan)
    profiles = {"onnx": onnx}
    fp32_path = onnx_path.with_name(artifacts.ONNX_MODEL)
    if fp32_path != onnx_path and fp32_path.is_file():
        profiles["onnx_fp32"] = profile(OnnxTarget(fp32_path, assets_dir), texts, plan)
    if not cfg.pytorch_reference:
        return profiles
    pytorch = profile(TorchTarget(model_dir, model_cfg), texts, plan)
    return {**profiles, "pytorch": pytorch,
            "pytorch_over_onnx": {"p50": pytorch["p50"] / onnx["p50"], "p95": pytorch["p95"] / onnx["p95"],
                                  "throughput": onnx["throughput_per_s"] / pytorch["throughput_per_s"]}}


def compare_with_champion(record: dict[str, Any], onnx_sha256: str, split: dict[str, Any], labels: list[str], texts: list[str],
                          scored: Scored, bootstrap: Bootstrap, cfg: EvaluateConfig) -> dict[str, Any]:
    """The champion scored on the same test rows; a paired bootstrap interval of the macro-F1 difference.

    `reason` is set when no paired comparison is possible; `paired` says whether one was made."""
    base = {"version": record["version"], "onnx_sha256": record.get("onnx_sha256"), "paired": False,
            "margin": cfg.non_inferiority_margin}
    if record["version"] is None:
        return base
    version = record["version"]
    if record.get("onnx_sha256") == onnx_sha256:
        return base | {"paired": True, "same_file": True, "macro_f1": scored.macro_f1(),
                       "macro_f1_difference": {"value": 0.0, "low": 0.0, "high": 0.0, "confidence": bootstrap.confidence}}
    if record.get("split") != split:
        recorded = f"split {record['split']}" if record.get("split") else "no split record"
        return base | {"reason": f"champion v{version} has {recorded}, this test split is {split}: its training rows may be "
                                 f"in this test split, so no paired comparison is possible; replacing it needs a forced promotion"}
    with temporary_dir() as scratch:
        try:
            registry = Registry()
            folder = registry.download(Version(record["model_name"], version, record.get("run_id"), {}), Path(scratch))
            if not (folder / artifacts.ONNX_MODEL).is_file():
                return base | {"reason": f"champion v{version}'s artifact cannot be loaded from the registry store "
                                         f"({artifacts.ONNX_MODEL} is missing there)"}
            if content_hash(folder / artifacts.ONNX_MODEL) != record.get("onnx_sha256"):
                return base | {"reason": f"champion v{version}'s artifact in the registry store is not the file its onnx_sha256 tag names"}
            champion = OnnxClassifier.from_mlflow_model(folder, cfg.threads)
        except Exception as error:  # a missing or corrupt artifact is a verdict entry, not a crash
            return base | {"reason": f"champion v{version}'s artifact cannot be loaded from the registry store ({type(error).__name__}: "
                                     f"{first_line(error, 160)})"}
        if champion.labels != labels:
            return base | {"reason": f"champion v{version} predicts labels {champion.labels}, the candidate {labels}"}
        predicted = champion.logits(texts).argmax(axis=-1)
    difference = scored.macro_f1_difference(predicted, bootstrap)
    return base | {"paired": True, "macro_f1": scored.macro_f1(predicted), "macro_f1_difference": difference,
                   "disagreement": float((predicted != scored.predicted).mean())}


# --- the verdict ----------------------------------------------------------------------------------------------

def gate_checks(metrics: dict[str, Any], parity: dict[str, Any], cfg: EvaluateConfig) -> list[Check]:
    intervals, latency_ms = metrics["intervals"], metrics["latency_ms"]
    absent = metrics["absent_labels"]
    checks = [
        Check("test_label_coverage", not absent, len(absent), 0,
              f"no test rows for {', '.join(map(repr, absent))}: the model cannot be judged on that class" if absent
              else "every label has test rows"),
        interval_check("accuracy", intervals["accuracy"], cfg.min_accuracy),
        interval_check("macro_f1", intervals["macro_f1"], cfg.min_macro_f1),
        Check("onnx_parity", bool(parity["passed"]), parity["max_abs_logit_diff"], parity["thresholds"]["max_abs_logit_diff"],
              f"ONNX vs PyTorch max |Δlogit| {parity['max_abs_logit_diff']:.2e}, argmax agreement {parity['argmax_agreement']:.4f}"),
        champion_check(metrics["champion"]),
        baseline_check(metrics["baseline"], cfg),
        worst_case("robustness_flip_rate", metrics["robustness"]["worst_flip"], "flip_rate", cfg.max_flip_rate, "of predictions flip"),
        worst_case("robustness_accuracy_drop", metrics["robustness"]["worst_drop"], "accuracy_drop", cfg.max_accuracy_drop, "accuracy lost"),
        slice_check(metrics["slices"], cfg),
        Check("calibration_ece", metrics["calibration"]["ece"] <= cfg.max_ece, metrics["calibration"]["ece"], cfg.max_ece,
              f"expected calibration error {metrics['calibration']['ece']:.4f} over {cfg.calibration_bins} bins "
              f"({'≤' if metrics['calibration']['ece'] <= cfg.max_ece else '>'} {cfg.max_ece}; reported, not gating)", severity="warning"),
        Check("latency_p95_ms", latency_ms["p95"] <= cfg.max_latency_p95_ms, latency_ms["p95"], cfg.max_latency_p95_ms,
              f"batch-1 P95 {latency_ms['p95']:.2f} ms over {latency_ms['samples']} requests, tokenisation included "
              f"({'≤' if latency_ms['p95'] <= cfg.max_latency_p95_ms else '>'} {cfg.max_latency_p95_ms} ms)"),
        Check("latency_p99_ms", latency_ms["p99"] <= cfg.max_latency_p99_ms, latency_ms["p99"], cfg.max_latency_p99_ms,
              f"batch-1 P99 {latency_ms['p99']:.2f} ms ({'≤' if latency_ms['p99'] <= cfg.max_latency_p99_ms else '>'} {cfg.max_latency_p99_ms} ms)"),
    ]
    return checks


def ci_text(interval: dict[str, Any]) -> str:
    return f"{interval['value']:+.4f} ({interval['confidence']:.0%} CI {interval['low']:+.4f} to {interval['high']:+.4f})"


def interval_check(name: str, interval: dict[str, Any], minimum: float) -> Check:
    passed = interval["value"] >= minimum
    return Check(name, passed, interval["value"], minimum,
                 f"{name} {interval['value']:.4f} ({interval['confidence']:.0%} CI {interval['low']:.4f}–{interval['high']:.4f}) "
                 f"{'≥' if passed else '<'} minimum {minimum}")


def champion_check(champion: dict[str, Any]) -> Check:
    margin = champion["margin"]
    if champion["version"] is None:
        return Check("champion_non_inferiority", True, None, -margin, "first model for this name: absolute thresholds only", severity="info")
    if not champion["paired"]:
        return Check("champion_non_inferiority", False, None, -margin, champion["reason"])
    difference = champion["macro_f1_difference"]
    passed = difference["low"] >= -margin
    if champion.get("same_file"):
        return Check("champion_non_inferiority", True, 0.0, -margin, f"the candidate is champion v{champion['version']}'s own ONNX file")
    return Check("champion_non_inferiority", passed, difference["low"], -margin,
                 f"macro-F1 minus champion v{champion['version']}'s on the same test rows {ci_text(difference)}: lower bound "
                 f"{'≥' if passed else '<'} −{margin} ({'non-inferior' if passed else 'may be worse than the champion'})")


def baseline_check(baseline: dict[str, Any], cfg: EvaluateConfig) -> Check:
    difference = baseline["macro_f1_difference"]
    passed = difference["low"] > 0
    verdict = "beats it" if passed else ("is worse" if difference["high"] < 0 else "does not beat it beyond noise")
    return Check("beats_baseline", passed, difference["low"], 0.0,
                 f"macro-F1 minus TF-IDF + logistic regression's ({baseline['macro_f1']:.4f}) {ci_text(difference)}: the model {verdict}"
                 + ("" if cfg.require_beats_baseline else " (evaluate.require_beats_baseline is off: reported, not gating)"),
                 severity="error" if cfg.require_beats_baseline else "warning")


def worst_case(name: str, worst: dict[str, Any], key: str, maximum: float, what: str) -> Check:
    passed = worst[key] <= maximum
    return Check(name, passed, worst[key], maximum,
                 f"worst perturbation {worst['perturbation']}: {worst[key]:.2%} {what} ({'≤' if passed else '>'} {maximum:.0%})")


def slice_check(found: dict[str, Any], cfg: EvaluateConfig) -> Check:
    worst = found["worst"]
    if worst is None:
        return Check("slice_f1_gap", True, None, cfg.max_slice_f1_gap, f"no slice has ≥ {cfg.min_slice_support} test rows: reported, not gated")
    passed = worst["f1_gap"] <= cfg.max_slice_f1_gap
    return Check("slice_f1_gap", passed, worst["f1_gap"], cfg.max_slice_f1_gap,
                 f"worst slice {worst['slice']} ({worst['support']} rows): macro-F1 {worst['macro_f1']:.4f}, "
                 f"{worst['f1_gap']:+.4f} below overall ({'≤' if passed else '>'} {cfg.max_slice_f1_gap})")


def summary_line(metrics: dict[str, Any], checks: list[Check]) -> str:
    failed = [check.name for check in checks if check.gating and not check.passed]
    macro_f1 = metrics["intervals"]["macro_f1"]
    head = f"macro-F1 {macro_f1['value']:.4f} ({macro_f1['low']:.4f}–{macro_f1['high']:.4f})"
    return f"{head}; " + (f"failed: {', '.join(failed)}" if failed else "every gating check passed")


def render_markdown(metrics: dict[str, Any], verdict: dict[str, Any]) -> str:
    runtimes = {name: metrics["latency"][name] for name in RUNTIMES if name in metrics["latency"]}
    lines = [
        f"# Evaluation gate: {'PASSED' if verdict['passed'] else 'FAILED'}",
        "",
        f"{verdict['summary']}. On `{verdict['onnx_file']}` (sha256 `{verdict['onnx_sha256'][:12]}`), {metrics['test_rows']} test texts.",
        "",
        "| check | result | gating | reason |", "|---|---|---|---|",
        *(f"| {check['name']} | {'pass' if check['passed'] else '**FAIL**'} | {'yes' if check['gating'] else 'no'} | {check['reason']} |"
          for check in verdict["checks"]),
        "",
        "| metric | value |", "|---|---|",
        *(f"| {name} | {ci_text(metrics['intervals'][name])[1:]} |" for name in ("accuracy", "macro_f1")),
        f"| ROC-AUC ({metrics['roc_auc_average']}) | {metrics['roc_auc'] if metrics['roc_auc'] is None else round(metrics['roc_auc'], 4)} |",
        f"| log loss | {metrics['log_loss']:.4f} |",
        f"| expected calibration error | {metrics['calibration']['ece']:.4f} |",
        f"| baseline macro-F1 (TF-IDF + LR) | {metrics['baseline']['macro_f1']:.4f} |",
        "",
        "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
        *(f"| {label} | " + (" | ".join(f"{row[key]:.3f}" for key in ("precision", "recall", "f1")) if not row.get("absent")
                             else "absent | absent | absent") + f" | {row['support']} |" for label, row in metrics["per_class"].items()),
        "",
        f"Robustness (rate {metrics['robustness']['rate']}, seed {metrics['robustness']['seed']}; clean accuracy "
        f"{metrics['robustness']['clean_accuracy']:.4f}):",
        "",
        "| perturbation | accuracy | drop | flip rate |", "|---|---|---|---|",
        *(f"| {name} | {row['accuracy']:.4f} | {row['accuracy_drop']:+.4f} | {row['flip_rate']:.2%} |"
          for name, row in metrics["robustness"]["perturbations"].items()),
        "",
        "| slice | rows | accuracy | macro-F1 | gap | gated |", "|---|---|---|---|---|---|",
        *(f"| {row['slice']} | {row['support']} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | {row['f1_gap']:+.4f} | "
          f"{'yes' if row['gated'] else 'no'} |" for row in metrics["slices"]["slices"]),
        "",
        "| latency and cost | " + " | ".join(RUNTIMES[name] for name in runtimes) + " |", "|---|" + "---|" * len(runtimes),
        *(f"| {label} | " + " | ".join(f"{value(row):.{digits}f}" for row in runtimes.values()) + " |" for label, value, digits in (
            ("P50 ms (batch 1)", lambda row: row["p50"], 2), ("P95 ms", lambda row: row["p95"], 2), ("P99 ms", lambda row: row["p99"], 2),
            (f"throughput /s (batch {runtimes['onnx']['throughput_batch_size']})", lambda row: row["throughput_per_s"], 1),
            ("cold start ms (load + first request)", lambda row: row["cold_start_ms"]["total"], 0),
            ("peak RSS MB (its own process)", lambda row: row["peak_rss_mb"], 0),
            ("file size MB", lambda row: row["size_bytes"] / 1e6, 1))),
        "",
        "![confusion matrix](plots/confusion_matrix.png) ![reliability](plots/reliability.png) ![latency](plots/latency.png)",
    ]
    return "\n".join(lines) + "\n"


RUNTIMES = {"onnx": "ONNX Runtime (shipped)", "onnx_fp32": "ONNX Runtime fp32 (not shipped)", "pytorch": "PyTorch"}


# --- plots ----------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    figure, axes = _pyplot().subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2))
    ConfusionMatrixDisplay(np.array(matrix), display_labels=labels).plot(ax=axes, colorbar=False, xticks_rotation=45)
    axes.set_title("Test confusion matrix (ONNX model)")
    _save(figure, path)


def plot_reliability(calibration: dict[str, Any], path: Path) -> None:
    figure, axes = _pyplot().subplots(figsize=(5, 5))
    table = calibration["reliability"]
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    axes.bar([row["low"] for row in table], [row["accuracy"] for row in table], width=1 / calibration["bins"], align="edge",
             edgecolor="black", alpha=0.7, label="accuracy in bin")
    axes.plot([row["confidence"] for row in table], [row["accuracy"] for row in table], marker="o", color="black")
    axes.set(xlabel="top-label confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
             title=f"Reliability (ECE {calibration['ece']:.4f})")
    axes.legend(loc="upper left")
    _save(figure, path)


def plot_latency(timings: dict[str, list[float]], path: Path) -> None:
    figure, axes = _pyplot().subplots(figsize=(7, 4))
    for name, values in timings.items():
        axes.hist(values, bins=60, alpha=0.6, label=f"{name} (P95 {np.percentile(values, 95):.1f} ms)")
    axes.set(xlabel="batch-1 request latency, ms (tokenisation included)", ylabel="requests", title="Latency")
    axes.legend()
    _save(figure, path)
