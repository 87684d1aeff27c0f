"""`tuneflow` command line: the whole flow (`run`) or one stage at a time (what dvc.yaml calls)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from tuneflow import progress
from tuneflow.errors import TuneflowError

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
    deploy = commands.add_parser("deploy", help="serve Prefect deployments: one cron schedule per pipeline in pipelines.yaml")
    deploy.add_argument("--pipeline", action="append", dest="pipelines", metavar="NAME",
                        help="only this pipeline (repeatable; default: every pipeline with a schedule)")
    deploy.add_argument("--pipelines-file", default="pipelines.yaml")
    deploy.add_argument("--dry-run", action="store_true", help="print the deployments and exit instead of serving them")
    compare = commands.add_parser("compare", parents=[overrides], help="train several methods on the same split and compare them")
    compare.add_argument("--methods", required=True, help="comma-separated train.method names, e.g. lora,full,prefix")
    for name in STAGE_NAMES:
        stage = commands.add_parser(name, parents=[overrides], help=f"run only the {name} stage (dvc.yaml calls these)")
        if name == "validate":
            stage.add_argument("--fix", action="store_true",
                               help="drop leaked and conflicting validation/test rows (see fix_diff.json), then re-validate")
    return parser


def main(argv: list[str] | None = None) -> int:
    # No phoning home from the tools we drive (and no error lines on offline machines); users may opt in.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # bitsandbytes (imported by PEFT) warns on every start that an optional hub-fetched CPU kernel is absent
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
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
    from tuneflow.config import load_params, parse_set, pipeline_params

    if args.command == "deploy":
        return deploy(args)
    command_line = ("--set", parse_set(args.overrides))
    if args.command == "run":
        pipeline_name, params = pipeline_params(args.pipeline, args.params, args.pipelines_file, command_line)
        return run_pipeline(params, pipeline_name)

    if args.command == "compare":
        return run_compare(load_params(args.params, command_line), args)

    from tuneflow.stages import STAGES

    fix_flag = {"validation.fix": True} if getattr(args, "fix", False) else {}
    params = load_params(args.params, command_line, ("--fix", fix_flag))
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


def deploy(args: argparse.Namespace) -> int:
    from flows.retrain import build_deployments

    deployments = build_deployments(args.pipelines_file, args.params, args.pipelines)
    for deployment in deployments:
        cron = ", ".join(schedule.schedule.cron for schedule in deployment.schedules or []) or "no schedule (run on demand)"
        print(f"{deployment.name}: {cron} → flow {deployment.flow_name} (pipeline={deployment.parameters['pipeline']})")
    if args.dry_run:
        return EXIT_OK
    from prefect import serve

    progress.say(f"[tuneflow] serving {len(deployments)} deployment(s) on {os.environ.get('PREFECT_API_URL') or 'an ephemeral server'}; Ctrl-C stops")
    serve(*deployments)
    return EXIT_OK


def run_compare(params, args: argparse.Namespace) -> int:
    from tuneflow.errors import InputError
    from tuneflow.methods import METHODS

    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if not methods or unknown:
        raise InputError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    os.environ.setdefault("PREFECT_LOGGING_LOG_PRINTS", "true")
    from flows.compare import compare

    compare(params=params, methods=methods, params_file=args.params, overrides=args.overrides)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
