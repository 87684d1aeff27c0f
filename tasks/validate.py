"""Stage 2 — validate: the data gate. Fails closed with evidence before any training happens.

Writes artifacts/validation/report.json (the contract), report.md and metrics.json (for `dvc metrics`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from tasks.ingest import SPLITS, read_splits
from tuneflow.artifacts import atomic_dir, read_json, write_json
from tuneflow.config import ValidationConfig
from tuneflow.text import fold, stable_hash

Severity = Literal["error", "warning", "info"]


@dataclass
class Check:
    name: str
    passed: bool
    severity: Severity
    value: Any
    threshold: Any
    evidence: list[Any] = field(default_factory=list)
    message: str = ""


@dataclass(frozen=True)
class ValidationResult:
    passed: bool
    checks: list[Check]
    report_dir: Path

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed and check.severity == "error"]


def validate(data_dir: Path, cfg: ValidationConfig, out_dir: Path) -> ValidationResult:
    """Run every check on the splits; write the report whether or not the gate passes."""
    splits = read_splits(data_dir)
    card = read_json(data_dir / "data_card.json")
    checks = [
        check_schema(splits),
        check_non_empty_text(splits, cfg),
        check_min_rows(splits, cfg),
        check_label_set(splits, card["labels"]),
        check_exact_leakage(splits, cfg),
    ]
    passed = not any(not check.passed and check.severity == "error" for check in checks)
    report = {"passed": passed, "checks": [asdict(check) for check in checks], "data_hash": card["data_hash"]}
    with atomic_dir(out_dir) as staging:
        write_json(staging / "report.json", report)
        write_json(staging / "metrics.json", {check.name: _metric(check.value) for check in checks})
        (staging / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return ValidationResult(passed, checks, out_dir)


def check_schema(splits: dict[str, pd.DataFrame]) -> Check:
    problems = []
    for name, frame in splits.items():
        if list(frame.columns) != ["text", "label"]:
            problems.append({"split": name, "columns": list(frame.columns)})
        elif not all(pd.api.types.is_string_dtype(frame[column]) for column in ("text", "label")):
            problems.append({"split": name, "dtypes": {c: str(t) for c, t in frame.dtypes.items()}})
    return Check("schema", not problems, "error", len(problems), 0, problems,
                 "every split has exactly the string columns text, label")


def check_non_empty_text(splits: dict[str, pd.DataFrame], cfg: ValidationConfig) -> Check:
    evidence = [
        {"split": name, "row": int(row)}
        for name, frame in splits.items()
        for row in frame.index[frame["text"].isna() | (frame["text"].str.strip() == "")]
    ]
    return Check("non_empty_text", not evidence, "error", len(evidence), 0, evidence[: cfg.evidence_rows],
                 "no empty or whitespace-only text")


def check_min_rows(splits: dict[str, pd.DataFrame], cfg: ValidationConfig) -> Check:
    sizes = {name: len(frame) for name, frame in splits.items()}
    small = [{"split": name, "rows": rows} for name, rows in sizes.items() if rows < cfg.min_rows_per_split]
    return Check("min_rows_per_split", not small, "error", min(sizes.values()), cfg.min_rows_per_split, small,
                 f"each split has at least {cfg.min_rows_per_split} rows")


def check_label_set(splits: dict[str, pd.DataFrame], schema_labels: list[str]) -> Check:
    expected = set(schema_labels)
    evidence = []
    for name, frame in splits.items():
        found = set(frame["label"].dropna())
        unknown, absent = sorted(found - expected), sorted(expected - found)
        if unknown or (name == "train" and absent):
            evidence.append({"split": name, "unknown_labels": unknown, "missing_labels": absent if name == "train" else []})
    return Check("label_set", not evidence, "error", len(evidence), 0, evidence,
                 "labels are the schema's label set and every class is present in train")


def check_exact_leakage(splits: dict[str, pd.DataFrame], cfg: ValidationConfig) -> Check:
    """The same normalised text in two splits: the model is tested on what it trained on."""
    locations: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name in SPLITS:
        for row, text in enumerate(splits[name]["text"]):
            locations[stable_hash(fold(text))].append((name, row))
    groups = [places for places in locations.values() if len({split for split, _ in places}) > 1]
    evidence = [
        [{"split": split, "row": row, "label": splits[split]["label"].iat[row], "text": _excerpt(splits[split]["text"].iat[row])}
         for split, row in places]
        for places in groups[: cfg.evidence_rows]
    ]
    leaked_rows = sum(sum(1 for split, _ in places if split != "train") for places in groups)
    return Check("exact_leakage", not groups, "error", len(groups), 0, evidence,
                 f"{len(groups)} normalised texts appear in more than one split ({leaked_rows} validation/test rows)")


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Data gate: {'PASSED' if report['passed'] else 'FAILED'}", "", f"data hash `{report['data_hash']}`", "",
             "| check | result | severity | value | threshold | what it means |", "|---|---|---|---|---|---|"]
    for check in report["checks"]:
        mark = "pass" if check["passed"] else ("**FAIL**" if check["severity"] == "error" else "warn")
        lines.append(f"| {check['name']} | {mark} | {check['severity']} | {check['value']} | {check['threshold']} | {check['message']} |")
    for check in report["checks"]:
        if check["evidence"] and not check["passed"]:
            lines += ["", f"## Evidence: {check['name']}", "", "```json"]
            lines += [_json_line(item) for item in check["evidence"]]
            lines += ["```"]
    return "\n".join(lines) + "\n"


def _excerpt(text: str, width: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _metric(value: Any) -> Any:
    return value if isinstance(value, (int, float, bool)) else str(value)


def _json_line(item: Any) -> str:
    import json

    return json.dumps(item, ensure_ascii=False)
