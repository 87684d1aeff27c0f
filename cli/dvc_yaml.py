"""dvc.yaml, generated from the stage table: every stage's command, deps (input artifacts and code), params
sections and output folder, plus the metrics and plots DVC shows. A test fails when the committed file differs.

DVC hashes files, so a data source that is not a file in the repository (the built-in corpus, a folder, a
file elsewhere) enters through a `source` stage marked `always_changed` — DVC's pattern for external data:
it records the content hash of `data.source` in source.json, and ingest depends on that file, so ingest
re-runs exactly when the data changed. The `champion` stage reads the registry the same way: always run, its
small output not cached, so evaluate re-runs exactly when @champion moved.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.cache import code_dependencies
from pipeline.runner import sections_of
from pipeline.table import STAGES
from tuneflow import artifacts
from tuneflow.artifacts import write_json
from tuneflow.config import Params
from tuneflow.data import source_fingerprint
from tuneflow.errors import InputError

HEADER = """\
# Generated from the stage table (pipeline/table.py) by `tuneflow dvc-yaml`; do not edit by hand.
# `dvc repro` runs the same stage functions as `tuneflow run`, one `tuneflow <stage>` command each,
# with the deps, params and outputs the table declares (code deps derived from each stage's imports).
"""


def dvc_document(params: Params) -> dict[str, Any]:
    root = Path(params.artifacts).as_posix()
    fingerprint = f"{root}/{artifacts.SOURCE_FINGERPRINT}"
    stages: dict[str, Any] = {"source": {"cmd": "tuneflow fingerprint", "always_changed": True,
                                         "outs": [{fingerprint: {"cache": False}}]}}
    for stage in STAGES.values():
        deps = [f"{root}/{relative}" for relative in stage.inputs.values()]
        deps += [fingerprint] if stage.reads_source else []
        stages[stage.name] = {
            "cmd": f"tuneflow {stage.name}",
            **({"always_changed": True} if stage.always_changed else {}),
            "deps": deps + list(code_dependencies(stage.module)),
            "params": sections_of(stage),
            "outs": [{f"{root}/{stage.output}": {"cache": False}} if stage.always_changed else f"{root}/{stage.output}"],
        }
    return {
        "stages": stages,
        "metrics": [f"{root}/{path}" for stage in STAGES.values() for path in stage.metrics],
        "plots": [f"{root}/{path}" for stage in STAGES.values() for path in stage.plots]
                 + [{f"{root}/{path}": {"x": "step", "y": list(columns)}} for stage in STAGES.values()
                    for path, columns in stage.curves.items()],
    }


def render(params: Params) -> str:
    return HEADER + yaml.safe_dump(dvc_document(params), sort_keys=False, width=120)


def write_dvc_yaml(params: Params, path: Path, check: bool = False) -> int:
    text = render(params)
    if check:
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            raise InputError(f"{path}: differs from the stage table; run `tuneflow dvc-yaml` to regenerate it")
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({len(STAGES) + 1} stages)")
    return 0


def write_fingerprint(params: Params) -> int:
    """The `source` stage: data.source's content hash (an `hf:` dataset cannot be hashed: always new)."""
    fingerprint = source_fingerprint(params.data)
    artifacts.claim(Path(params.artifacts))  # the root is tuneflow's before anything is written into it
    write_json(Path(params.artifacts) / artifacts.SOURCE_FINGERPRINT,
               {"source": params.data.source, "sha256": fingerprint or f"unhashable, read at {time.time()}"})
    return 0
