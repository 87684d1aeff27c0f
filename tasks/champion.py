"""Stage — champion: what the registry's @champion is, for the evaluation gate to compare the candidate with.

Writes champion.json (no champion, or its version, ONNX sha256 and split record from its registry tags) and
report.md into its output folder (artifacts/champion/). It always runs — the registry is live state — and
evaluate depends on its output, so evaluate runs again exactly when the champion changed (the pattern of the
`source` stage for data). Promote refuses a verdict about another champion than the current one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneflow import artifacts
from tuneflow.artifacts import write_json
from tuneflow.config import PromoteConfig
from tuneflow.registry import CHAMPION, Registry, Version


@dataclass(frozen=True)
class ChampionResult:
    record: dict[str, Any]


def champion(cfg: PromoteConfig, out_dir: Path, registry: Registry | None = None) -> ChampionResult:
    current = (registry or Registry()).by_alias(cfg.model_name, CHAMPION)
    record = champion_record(cfg.model_name, current)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / artifacts.CHAMPION_RECORD, record)
    (out_dir / artifacts.REPORT).write_text(
        f"# Champion of `{cfg.model_name}`\n\n"
        + (f"v{record['version']} (ONNX sha256 `{(record['onnx_sha256'] or 'unknown')[:12]}`)\n" if current else "none yet\n"),
        encoding="utf-8")
    return ChampionResult(record)


def champion_record(model_name: str, current: Version | None) -> dict[str, Any]:
    if current is None:
        return {"model_name": model_name, "version": None}
    return {"model_name": model_name, "version": current.version, "run_id": current.run_id,
            "onnx_sha256": current.tags.get("onnx_sha256"), "split": split_from_tags(current.tags),
            "method": current.tags.get("method")}


def split_from_tags(tags: dict[str, str]) -> dict[str, Any] | None:
    try:
        return json.loads(tags["split"])
    except (KeyError, ValueError):
        return None  # registered before tuneflow recorded splits, or by hand
