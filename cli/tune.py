"""`tuneflow tune [--pipeline NAME] [--set KEY=VALUE ...]`: the Optuna study of flows/tune.py, and where its overlay goes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from tuneflow import progress

EXIT_OK = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", help="tune on a named pipeline of pipelines.yaml (default: params.yaml alone)")
    parser.add_argument("--pipelines-file", default="pipelines.yaml")


def tune(args: argparse.Namespace, command_line: tuple[str, dict[str, Any]]) -> int:
    from tuneflow.config import load_pipelines, pipeline_params

    run_name, params = pipeline_params(args.pipeline, args.params, args.pipelines_file, command_line)
    base = load_pipelines(args.pipelines_file).pipelines[args.pipeline].overrides() if args.pipeline else {}
    pipelines_file = Path(args.pipelines_file)
    overlay_path = pipelines_file.parent / params.tune.pipelines_file
    from tuneflow import tuning

    tuning.check_space(params, tuning.method_space(params))  # a bad space: exit 2 before Prefect starts
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    from flows.tune import tune as tune_flow

    result = tune_flow(params=params, base_overrides={**base, **command_line[1]}, run_name=run_name, overlay_path=overlay_path)
    included = pipelines_file.exists() and params.tune.pipelines_file in load_pipelines(pipelines_file).include
    rows = [("study", f"{result['study']} ({result['storage']})"),
            ("best trial", f"{result['best_trial']}: {result['metric']} {result['best_value']:.4f}"),
            ("best values", ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                                      for key, value in result["best_params"].items())),
            ("trials", ", ".join(f"{state.lower()} {sum(row['state'] == state for row in result['trials'])}"
                                 for state in sorted({row["state"] for row in result["trials"]}))),
            ("overlay", f"pipeline {result['pipeline']!r} in {overlay_path}"),
            ("next", f"tuneflow run --pipeline {result['pipeline']}  (trains it, then the gate reads the test split once)")]
    print(progress.table(rows, f"tuneflow tune · {run_name}"))
    if not included:
        progress.say(f"[tuneflow] note: {pipelines_file} does not include {params.tune.pipelines_file}; add "
                     f"`include: [{params.tune.pipelines_file}]` to it so that --pipeline {result['pipeline']} is found")
    return EXIT_OK
