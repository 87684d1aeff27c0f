"""Stage 2 — validate: the data gate. Fails closed with evidence before any training happens.

Reads the ingest splits and writes into its output folder (artifacts/validation/):
- report.json (the contract), report.md, metrics.json (for `dvc metrics`);
- data/{train,validation,test}.parquet + data_card.json: the gated data every later stage reads
  (a copy of the ingest splits, or the cleaned splits with `validation.fix`);
- fix_diff.json: every row `fix` removed and why (empty when nothing was removed).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.gate_checks import (
    Pair,
    class_balance,
    exact_duplicates,
    gx_checks,
    label_conflicts,
    label_coverage,
    near_duplicate_checks,
    near_duplicate_pairs,
    table,
)
from tuneflow import artifacts
from tuneflow.artifacts import read_json, split_file, write_json
from tuneflow.checks import Check, gate_passed
from tuneflow.config import ValidationConfig
from tuneflow.data import SPLITS, read_splits, splits_hash
from tuneflow.errors import DataGateFailed


@dataclass(frozen=True)
class ValidationResult:
    passed: bool
    checks: list[Check]
    report_dir: Path
    removed: list[dict[str, Any]]

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed and check.gating]

    @property
    def data_dir(self) -> Path:
        return self.report_dir / artifacts.GATED_DATA

    def failure(self, published: Path) -> DataGateFailed | None:
        """Raised by the stage runner once the report is published in `published`: the evidence outlives the failure."""
        if self.passed:
            return None
        failed = ", ".join(f"{check.name} ({check.reason})" for check in self.failed)
        return DataGateFailed(f"{published / artifacts.REPORT}: data gate failed: {failed}")


def validate(data_dir: Path, cfg: ValidationConfig, out_dir: Path) -> ValidationResult:
    """Run every check on the splits (fix and re-check when asked); write the report whether or not the gate passes."""
    splits = read_splits(data_dir)
    card = read_json(data_dir / artifacts.DATA_CARD)
    checks, rows, pairs = run_checks(splits, card["labels"], cfg, card.get("slice_columns", []))
    removed: list[dict[str, Any]] = []
    if cfg.fix:
        splits, removed = fix_splits(splits, rows, pairs)
        if removed:
            checks, _, _ = run_checks(splits, card["labels"], cfg, card.get("slice_columns", []))
    checks.append(Check("fix_removed_rows", True, len(removed), None,
              "rows removed from validation/test by validation.fix" if cfg.fix else "validation.fix is off",
              severity="info", evidence=_removal_summary(removed)))
    passed = gate_passed(checks)
    gated_card = _gated_card(card, splits, removed)
    report = {"passed": passed, "checks": [check.as_dict() for check in checks], "data_hash": gated_card["data_hash"],
              "source_data_hash": card["data_hash"]}
    gated_dir = out_dir / artifacts.GATED_DATA
    gated_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        splits[name].to_parquet(gated_dir / split_file(name), index=False)
    write_json(gated_dir / artifacts.DATA_CARD, gated_card)
    write_json(out_dir / artifacts.FIX_DIFF, {"fix": cfg.fix, "removed_rows": len(removed), "removed": removed})
    write_json(out_dir / artifacts.GATE_REPORT, report)
    write_json(out_dir / artifacts.METRICS, {"gate_passed": passed} | {check.name: _metric(check.value) for check in checks})
    (out_dir / artifacts.REPORT).write_text(render_markdown(report), encoding="utf-8")
    return ValidationResult(passed, checks, out_dir, removed)


def run_checks(splits: dict[str, pd.DataFrame], labels: list[str], cfg: ValidationConfig,
               slice_columns: list[str] = ()) -> tuple[list[Check], pd.DataFrame, list[Pair]]:
    rows = table(splits)
    pairs = near_duplicate_pairs(rows, cfg)
    checks = [
        *gx_checks(splits, rows, labels, ["text", "label", *slice_columns], cfg),
        label_conflicts(rows, cfg),
        *class_balance(rows, cfg),
        *label_coverage(rows, labels),
        *exact_duplicates(rows, cfg),
        *near_duplicate_checks(rows, pairs, cfg),
    ]
    return checks, rows, pairs


def fix_splits(splits: dict[str, pd.DataFrame], rows: pd.DataFrame, pairs: list[Pair]) -> tuple[dict[str, pd.DataFrame], list[dict[str, Any]]]:
    """Drop validation/test rows that leak from an earlier split or carry a conflicting label; train is never touched.

    Returns the cleaned splits and one entry per removed row: split, row (in the ingest split), label, text, reason.
    """
    order = {name: rank for rank, name in enumerate(SPLITS)}
    reasons: dict[tuple[str, int], str] = {}
    keyed = rows.dropna(subset=["key"])
    for _, group in keyed.groupby("key", sort=False):
        if len(group) < 2:
            continue
        places = list(zip(group["split"], group["row"].astype(int)))
        first = min(places, key=lambda place: (order[place[0]], place[1]))
        if group["label"].nunique() > 1:
            labels = ", ".join(sorted(map(str, group["label"].unique())))
            for place in places:
                if place[0] != "train":
                    reasons.setdefault(place, f"label_conflicts: the same text is labelled {labels}")
        for place in places:
            if place[0] != first[0] and place[0] != "train":
                reasons.setdefault(place, f"exact_leakage: same text as {first[0]} row {first[1]}")
    for pair in pairs:
        if pair.a[0] != pair.b[0]:
            earlier, later = sorted((pair.a, pair.b), key=lambda place: order[place[0]])
            reasons.setdefault(later, f"near_dup_leakage: Jaccard {pair.similarity:g} with {earlier[0]} row {earlier[1]}")
    indexed = rows.set_index(["split", "row"])
    removed = [{"split": split, "row": row, "label": indexed.at[(split, row), "label"], "text": indexed.at[(split, row), "text"], "reason": reason}
               for (split, row), reason in sorted(reasons.items(), key=lambda item: (order[item[0][0]], item[0][1]))]
    cleaned = {}
    for name in SPLITS:
        dropped = [row for split, row in reasons if split == name]
        cleaned[name] = splits[name].drop(index=splits[name].index[dropped]).reset_index(drop=True)
    return cleaned, removed


def _gated_card(card: dict[str, Any], splits: dict[str, pd.DataFrame], removed: list[dict[str, Any]]) -> dict[str, Any]:
    """The ingest data card with the counts and content hash of the data that passed through the gate."""
    gated = dict(card)
    gated["counts"] = {name: len(splits[name]) for name in SPLITS}
    gated["class_counts"] = {name: splits[name]["label"].astype(str).value_counts().sort_index().to_dict() for name in SPLITS}
    gated["rows_kept"] = sum(gated["counts"].values())
    gated["source_data_hash"] = card["data_hash"]
    gated["gate_removed"] = len(removed)
    gated["data_hash"] = splits_hash(splits) if removed else card["data_hash"]
    return gated


def _removal_summary(removed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts = Counter((item["split"], item["reason"].split(":")[0]) for item in removed)
    return [{"split": split, "reason": reason, "rows": rows} for (split, reason), rows in sorted(counts.items())]


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Data gate: {'PASSED' if report['passed'] else 'FAILED'}", "", f"data hash `{report['data_hash']}`", "",
             "| check | result | severity | value | threshold | what it means |", "|---|---|---|---|---|---|"]
    for check in report["checks"]:
        mark = "pass" if check["passed"] else {"error": "**FAIL**", "warning": "warn"}.get(check["severity"], "note")
        lines.append(f"| {check['name']} | {mark} | {check['severity']} | {check['value']} | {check['threshold']} | {check['reason']} |")
    for check in report["checks"]:
        if check["evidence"] and (not check["passed"] or check["name"] == "fix_removed_rows"):
            lines += ["", f"## Evidence: {check['name']}", "", "```json"]
            lines += [json.dumps(item, ensure_ascii=False, default=str) for item in check["evidence"]]
            lines += ["```"]
    return "\n".join(lines) + "\n"


def _metric(value: Any) -> Any:
    return value if isinstance(value, (int, float, bool)) else str(value)
