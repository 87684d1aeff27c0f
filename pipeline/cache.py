"""What a stage's result depends on, for both caches: DVC's (dvc.yaml deps and params) and Prefect's (task cache key).

A stage depends on its declared input artifacts, its params sections, its code — the stage module and every
tuneflow module it imports, directly or through others, found with grimp (the import graph import-linter
checks) — and, for ingest, the content of the data that `data.source` names.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from pipeline.runner import params_read
from pipeline.table import Stage
from tuneflow.artifacts import Layout, content_hash
from tuneflow.config import Params
from tuneflow.data import source_fingerprint

PROJECT = Path(__file__).resolve().parents[1]  # the checkout: tuneflow/, tasks/, pipeline/ ...
CODE_PACKAGES = ("tuneflow", "tasks")


@functools.cache
def code_dependencies(module: str) -> tuple[str, ...]:
    """Project-relative source files of `module` and of every core/task module it imports (lazy imports included)."""
    import grimp

    graph = grimp.build_graph(*CODE_PACKAGES, cache_dir=None)
    modules = {module, *graph.find_upstream_modules(module)}
    files = []
    for name in sorted(modules):
        path = PROJECT / Path(*name.split("."))
        files.append((path / "__init__.py") if path.is_dir() else path.with_suffix(".py"))
    return tuple(sorted(file.relative_to(PROJECT).as_posix() for file in files if file.exists()))


def stage_key(stage: Stage, params: Params) -> str | None:
    """sha256 of everything the stage's output depends on; None when it must always run."""
    if not stage.cache:
        return None
    layout = Layout(Path(params.artifacts))
    parts: dict[str, object] = {
        "stage": stage.name,
        "output": str(layout.path(stage.output).resolve()),
        "params": params_read(stage, params),
        "inputs": {relative: content_hash(layout.path(relative)) for relative in stage.inputs.values()},
        "code": {file: content_hash(PROJECT / file) for file in code_dependencies(stage.module)},
    }
    if stage.reads_source:
        parts["source"] = source_fingerprint(params.data)
        if parts["source"] is None:
            return None
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def output_hash(stage: Stage, params: Params) -> str | None:
    return content_hash(Layout(Path(params.artifacts)).path(stage.output))
