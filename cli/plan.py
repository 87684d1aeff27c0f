"""`tuneflow plan`: estimate every fine-tuning method on this data and machine before training, and recommend one.

The data: the gated splits when the data gate has passed the current ingest output, else the ingest output, else
ingest is run first through the stage runner (as `tuneflow ingest` would). The estimation itself is
tuneflow/planning.py; this driver only finds the data, passes it the train stage's functions, and writes
<artifacts>/plan/plan.json and plan.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from tuneflow import artifacts, progress
from tuneflow.artifacts import Layout, claim, read_json, write_json
from tuneflow.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", help="a named overlay from pipelines.yaml on top of params.yaml")
    parser.add_argument("--pipelines-file", default="pipelines.yaml")
    parser.add_argument("--methods", help="comma-separated methods to estimate (default: every method in the table)")
    parser.add_argument("--memory-limit-mb", dest="memory_limit_mb",
                        help="memory a method may use (default: this machine's available memory, or the GPU's)")
    parser.add_argument("--time-budget-s", dest="time_budget_s", help="training time a method may take, all epochs (default: none)")
    parser.add_argument("--steps", default="3", help="timed optimizer steps per method and padded length (default: 3)")


def positive(flag: str, raw: str | None, kind=float) -> Any:
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise InputError(f"{flag} {raw!r}: expected a positive {'integer' if kind is int else 'number'}")
    return value


def current_data(params) -> tuple[Path, dict[str, Any]]:
    """The folder of splits to plan on and its data card (ingesting first when the ingest output is missing or stale)."""
    from pipeline.runner import params_read, run_stage
    from pipeline.table import STAGES

    layout = Layout(Path(params.artifacts))
    data_dir = layout.path(artifacts.DATA)
    wanted = params_read(STAGES["ingest"], params)
    recorded = data_dir / artifacts.PARAMS
    fresh = recorded.is_file() and all(read_json(recorded).get(key) == value for key, value in wanted.items())
    if not fresh:
        with progress.stage("ingest (for plan)"):
            run_stage(STAGES["ingest"], params)
    card = read_json(data_dir / artifacts.DATA_CARD)
    report = layout.path(artifacts.VALIDATION) / artifacts.GATE_REPORT
    gated_card = layout.gated_data / artifacts.DATA_CARD
    if report.is_file() and gated_card.is_file():
        gate = read_json(report)
        if gate.get("passed") and gate.get("source_data_hash") == card["data_hash"]:
            return layout.gated_data, read_json(gated_card)
    return data_dir, card


def plan(args: argparse.Namespace, command_line: tuple[str, dict[str, Any]]) -> int:
    from tuneflow.config import pipeline_params

    methods = [name.strip() for name in args.methods.split(",") if name.strip()] if args.methods is not None else None
    from tuneflow.methods import METHODS

    unknown = [name for name in methods or [] if name not in METHODS]
    if (methods is not None and not methods) or unknown:
        raise InputError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    memory_limit = positive("--memory-limit-mb", args.memory_limit_mb)
    time_budget = positive("--time-budget-s", args.time_budget_s)
    steps = positive("--steps", args.steps, int)
    _, params = pipeline_params(args.pipeline, args.params, args.pipelines_file, command_line)

    import tasks.train as train_stage
    from tuneflow.data import read_splits
    from tuneflow.planning import plan as make_plan, render

    data_dir, card = current_data(params)
    progress.say(f"[tuneflow] plan: data from {data_dir}")
    result = make_plan(params, read_splits(data_dir), card, train_stage, methods, memory_limit, time_budget, steps)
    root = Path(params.artifacts)
    claim(root)
    out_dir = root / artifacts.PLAN
    markdown = render(result)
    write_json(out_dir / artifacts.PLAN_JSON, result.to_json())
    (out_dir / artifacts.PLAN_MD).write_text(markdown, encoding="utf-8")
    print(markdown)
    progress.say(f"[tuneflow] plan written to {out_dir / artifacts.PLAN_JSON}")
    return 0
