"""Stage 2 — validate: the data gate. Fails closed with evidence before any training happens.

Reads the ingest splits and writes into its output folder (artifacts/validation/):
- report.json (the contract), report.md, metrics.json (for `dvc metrics`);
- data/{train,validation,test}.parquet + data_card.json: the gated data every later stage reads
  (a copy of the ingest splits, or the cleaned splits with `validation.fix`);
- fix_diff.json: every row `fix` removed and why (empty when nothing was removed).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.gate_checks import (
    GateTable,
    NearDuplicates,
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
from tuneflow.data import SPLITS, splits_hash
from tuneflow.errors import DataGateFailed, InputError


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
    """Run every check on the splits (fix and re-check when asked); write the report whether or not the gate passes.

    The splits are read from their parquet files a chunk at a time (tasks.gate_checks.SplitSource), never loaded
    whole: memory stays far below the data's size."""
    missing = [name for name in SPLITS if not (data_dir / split_file(name)).exists()]
    if missing:
        raise InputError(f"{data_dir}: missing split(s) {', '.join(missing)}; run `tuneflow ingest` first")
    card = read_json(data_dir / artifacts.DATA_CARD)
    gated_dir = out_dir / artifacts.GATED_DATA
    gated_dir.mkdir(parents=True, exist_ok=True)
    checks, rows, pairs = run_checks(data_dir, card["labels"], cfg, card.get("slice_columns", []))
    removed: list[dict[str, Any]] = []
    dropped: dict[str, set[int]] = {}
    if cfg.fix:
        removed, dropped = fix_splits(rows, pairs)
    rows.close()
    write_gated_splits(data_dir, gated_dir, dropped)
    if removed:
        checks, rows, _ = run_checks(gated_dir, card["labels"], cfg, card.get("slice_columns", []))
        rows.close()
    checks.append(Check("fix_removed_rows", True, len(removed), None,
              "rows removed from validation/test by validation.fix" if cfg.fix else "validation.fix is off",
              severity="info", evidence=_removal_summary(removed)))
    passed = gate_passed(checks)
    gated_card = _gated_card(card, gated_dir, removed)
    report = {"passed": passed, "checks": [check.as_dict() for check in checks], "data_hash": gated_card["data_hash"],
              "source_data_hash": card["data_hash"]}
    write_json(gated_dir / artifacts.DATA_CARD, gated_card)
    write_json(out_dir / artifacts.FIX_DIFF, {"fix": cfg.fix, "removed_rows": len(removed), "removed": removed})
    write_json(out_dir / artifacts.GATE_REPORT, report)
    write_json(out_dir / artifacts.METRICS, {"gate_passed": passed} | {check.name: _metric(check.value) for check in checks})
    (out_dir / artifacts.REPORT).write_text(render_markdown(report), encoding="utf-8")
    return ValidationResult(passed, checks, out_dir, removed)


def run_checks(splits: dict[str, pd.DataFrame] | Path, labels: list[str], cfg: ValidationConfig,
               slice_columns: list[str] = ()) -> tuple[list[Check], GateTable, NearDuplicates]:
    """Every check on the splits: frames in memory, or the folder of split parquet files (read a chunk at a time)."""
    rows = table(splits)
    pairs = near_duplicate_pairs(rows, cfg)
    checks = [
        *gx_checks(rows, labels, ["text", "label", *slice_columns], cfg),
        label_conflicts(rows, cfg),
        *class_balance(rows, cfg),
        *label_coverage(rows, labels),
        *exact_duplicates(rows, cfg),
        *near_duplicate_checks(rows, pairs, cfg),
    ]
    return checks, rows, pairs


def fix_splits(rows: GateTable, pairs: NearDuplicates) -> tuple[list[dict[str, Any]], dict[str, set[int]]]:
    """Which validation/test rows to drop: those that leak from an earlier split or carry a conflicting label; train
    is never touched.

    Returns one entry per removed row (split, row in the ingest split, label, text, reason) and the rows to drop per
    split. Near-duplicate groups are walked once per row, not once per row pair (see NearGroup)."""
    order = {name: rank for rank, name in enumerate(SPLITS)}
    reasons: dict[tuple[str, int], str] = {}
    frame = rows.rows
    keyed = frame[frame["key"] >= 0]
    repeated = keyed[keyed.duplicated("key", keep=False)]
    for _, group in repeated.groupby("key", sort=False):
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
    for group in pairs.groups:
        # a row's reason comes from the first pair (a-major order) where it is the later one: in its own group that is
        # the first partner from an earlier split
        sides = ([rows.place(position) for position in group.a], [rows.place(position) for position in group.b])
        for mine, partners in (sides, sides[::-1]):
            first_of = {}
            for place in partners:
                first_of.setdefault(place[0], place)
            for place in mine:
                earlier = [first_of[split] for split in SPLITS[: order[place[0]]] if split in first_of]
                if earlier:
                    partner = min(earlier, key=partners.index)
                    reasons.setdefault(place, f"near_dup_leakage: Jaccard {group.similarity:g} with {partner[0]} row {partner[1]}")
    ordered = sorted(reasons.items(), key=lambda item: (order[item[0][0]], item[0][1]))
    positions = [rows.position(place) for place, _ in ordered]
    texts, labels = rows.texts(positions), frame["label"].to_numpy()[positions] if positions else []
    removed = [{"split": split, "row": row, "label": label, "text": text, "reason": reason}
               for ((split, row), reason), label, text in zip(ordered, labels, texts)]
    dropped: dict[str, set[int]] = {}
    for split, row in reasons:
        dropped.setdefault(split, set()).add(row)
    return removed, dropped


def write_gated_splits(data_dir: Path, gated_dir: Path, dropped: dict[str, set[int]]) -> None:
    """The gated data: each ingest split copied, or rewritten a row group at a time without its dropped rows."""
    for name in SPLITS:
        source, target = data_dir / split_file(name), gated_dir / split_file(name)
        if not dropped.get(name):
            shutil.copyfile(source, target)
            continue
        file, start = pq.ParquetFile(source), 0
        with pq.ParquetWriter(target, file.schema_arrow) as writer:
            for group in range(file.num_row_groups):
                part = file.read_row_group(group)
                keep = np.array([start + offset not in dropped[name] for offset in range(part.num_rows)], dtype=bool)
                writer.write_table(part.filter(pa.array(keep)))
                start += part.num_rows


class _StreamedSplit:
    """What splits_hash reads from a split (`split[column]`, iterated), streamed from its parquet file."""

    def __init__(self, path: Path):
        self.path = path

    def __getitem__(self, column: str) -> Iterator[Any]:
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=100_000, columns=[column]):
            yield from batch.to_pandas()[column].tolist()


def _gated_card(card: dict[str, Any], gated_dir: Path, removed: list[dict[str, Any]]) -> dict[str, Any]:
    """The ingest data card with the counts and content hash of the data that passed through the gate."""
    labels = {name: pd.read_parquet(gated_dir / split_file(name), columns=["label"])["label"] for name in SPLITS}
    gated = dict(card)
    gated["counts"] = {name: len(labels[name]) for name in SPLITS}
    gated["class_counts"] = {name: labels[name].astype(str).value_counts().sort_index().to_dict() for name in SPLITS}
    gated["rows_kept"] = sum(gated["counts"].values())
    gated["source_data_hash"] = card["data_hash"]
    gated["gate_removed"] = len(removed)
    gated["data_hash"] = (splits_hash({name: _StreamedSplit(gated_dir / split_file(name)) for name in SPLITS})
                          if removed else card["data_hash"])
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
