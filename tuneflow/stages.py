"""The six stages wired to their params sections and artifact paths: what the CLI, DVC and Prefect call."""

from __future__ import annotations

from typing import Any, Callable

from tuneflow.artifacts import Layout, read_json
from tuneflow.config import Params
from tuneflow.errors import DataGateFailed, InputError

STAGE_NAMES = ("ingest", "validate", "train", "export", "evaluate", "promote")


def run_ingest(params: Params, layout: Layout, **_: Any):
    from tasks.ingest import ingest

    return ingest(params.data, layout.data)


def run_validate(params: Params, layout: Layout, **_: Any):
    from tasks.validate import validate

    result = validate(layout.data, params.validation, layout.validation)
    if not result.passed:
        failed = ", ".join(f"{check.name} ({check.message})" for check in result.failed)
        raise DataGateFailed(f"{layout.validation / 'report.md'}: data gate failed: {failed}")
    return result


def require_gate_passed(layout: Layout) -> None:
    """Fail closed: no training on data the gate has not passed (or on data changed since)."""
    report_path = layout.validation / "report.json"
    if not report_path.exists():
        raise InputError(f"{report_path}: missing; run `tuneflow validate` before training")
    report = read_json(report_path)
    if not report["passed"]:
        raise DataGateFailed(f"{layout.validation / 'report.md'}: the data gate failed for this data; training refused")
    gated_card, ingested = layout.gated_data / "data_card.json", layout.data / "data_card.json"
    if not gated_card.exists():
        raise InputError(f"{gated_card}: missing; run `tuneflow validate` before training")
    gated_hash, current = read_json(gated_card)["data_hash"], read_json(ingested)["data_hash"] if ingested.exists() else None
    if report["data_hash"] != gated_hash:
        raise InputError(f"{report_path}: validated data {report['data_hash'][:12]} is not the gated data {gated_hash[:12]}; run `tuneflow validate`")
    if current is not None and report.get("source_data_hash") != current:
        raise InputError(f"{report_path}: validated data is not the current ingest data {current[:12]}; run `tuneflow validate`")


def run_train(params: Params, layout: Layout, **_: Any):
    from tasks.train import train

    require_gate_passed(layout)
    return train(layout.gated_data, params.model, params.train, layout.model, layout.work)


def run_export(params: Params, layout: Layout, **_: Any):
    from tasks.export import export

    return export(layout.model, layout.gated_data, params.model, params.export, layout.export)


def run_evaluate(params: Params, layout: Layout, **_: Any):
    from tasks.evaluate import evaluate

    return evaluate(layout.export, layout.gated_data, params.evaluate, layout.eval)


def run_promote(params: Params, layout: Layout, pipeline: str = "default", **_: Any):
    from tasks.promote import promote

    return promote(layout, params, layout.promotion, pipeline=pipeline)


STAGES: dict[str, Callable[..., Any]] = {
    "ingest": run_ingest,
    "validate": run_validate,
    "train": run_train,
    "export": run_export,
    "evaluate": run_evaluate,
    "promote": run_promote,
}


def summary_rows(layout: Layout) -> list[tuple[str, str]]:
    """The final summary table, read back from the artifacts of the last run."""
    card = read_json(layout.gated_data / "data_card.json")
    metrics = read_json(layout.eval / "metrics.json")
    decision = read_json(layout.promotion / "decision.json")
    train_summary = read_json(layout.model / "train_summary.json")
    counts, latency = card["counts"], metrics["latency_ms"]
    return [
        ("data", f"{card['source']}: train {counts['train']}, validation {counts['validation']}, test {counts['test']} "
                 f"({card['dropped']['duplicates']} duplicates, {card['dropped']['empty_text'] + card['dropped']['empty_label']} empty rows dropped, "
                 f"{card.get('gate_removed', 0)} removed by the data gate)"),
        ("method", f"{train_summary['method']} on {train_summary['base_model']}, {train_summary['trainable_params']:,} trainable params, "
                   f"{train_summary['train_time_s']:.0f}s training, best epoch {train_summary['best_epoch']:g}"),
        ("test macro-F1", f"{metrics['macro_f1']:.4f} (accuracy {metrics['accuracy']:.4f}) on the ONNX model"),
        ("latency", f"P50 {latency['p50']:.2f} ms, P95 {latency['p95']:.2f} ms, P99 {latency['p99']:.2f} ms (batch 1, {latency['samples']} requests)"),
        ("registry", f"{decision['model_name']} v{decision['version']} @{decision['alias']}"),
        ("promoted", f"{'yes' if decision['promoted'] else 'no'}: {'; '.join(decision['reasons'])}"),
    ]
