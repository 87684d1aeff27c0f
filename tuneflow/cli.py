"""`tuneflow` command line: the whole flow (`run`) or one stage at a time (what dvc.yaml calls)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from tuneflow import progress
from tuneflow.errors import InputError, TuneflowError

EXIT_OK, EXIT_UNEXPECTED = 0, 1


def build_parser() -> argparse.ArgumentParser:
    from tuneflow.stages import STAGE_NAMES

    parser = argparse.ArgumentParser(prog="tuneflow", description="Fine-tune, gate, export and promote text classifiers.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; defaults if absent)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a params key, e.g. --set train.epochs=2 (repeatable)")

    run = commands.add_parser("run", parents=[overrides], help="run the whole pipeline as a Prefect flow")
    run.add_argument("--pipeline", help="a pipeline name from pipelines.yaml (default: its `default`)")
    run.add_argument("--pipelines-file", default="pipelines.yaml")
    for name in STAGE_NAMES:
        commands.add_parser(name, parents=[overrides], help=f"run only the {name} stage (dvc.yaml calls these)")
    return parser


def main(argv: list[str] | None = None) -> int:
    # No phoning home from the tools we drive (and no error lines on offline machines); users may opt in.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except TuneflowError as error:
        print(f"tuneflow: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("tuneflow: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # anything unexpected: keep the traceback, end with one line
        traceback.print_exc()
        print(f"tuneflow: unexpected error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_UNEXPECTED


def dispatch(args: argparse.Namespace) -> int:
    from tuneflow.artifacts import Layout
    from tuneflow.config import load_params, load_pipelines, parse_set

    command_line = ("--set", parse_set(args.overrides))
    if args.command == "run":
        pipeline_name, pipeline_layer = "default", ("pipelines.yaml", {})
        if args.pipeline or Path(args.pipelines_file).exists():
            pipelines = load_pipelines(args.pipelines_file)
            pipeline_name = args.pipeline or pipelines.default
            if pipeline_name not in pipelines.pipelines:
                raise InputError(f"{args.pipelines_file}: unknown pipeline {pipeline_name!r} (--pipeline); "
                                 f"defined: {', '.join(pipelines.pipelines)}")
            pipeline_layer = (f"{args.pipelines_file} (pipeline {pipeline_name})", pipelines.pipelines[pipeline_name].overrides())
        return run_pipeline(load_params(args.params, pipeline_layer, command_line), pipeline_name)

    from tuneflow.stages import STAGES

    params = load_params(args.params, command_line)
    layout = Layout(Path(params.artifacts))
    with progress.stage(args.command):
        STAGES[args.command](params, layout, pipeline="stage-by-stage (params.yaml)")
    return EXIT_OK


def run_pipeline(params, pipeline_name: str) -> int:
    from flows.retrain import retrain

    progress.say(f"[tuneflow] pipeline {pipeline_name!r} through Prefect "
                 f"({os.environ.get('PREFECT_API_URL') or 'ephemeral local server'})")
    rows = retrain(params=params, pipeline=pipeline_name)
    print(progress.table(rows, f"tuneflow run · pipeline {pipeline_name}"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
