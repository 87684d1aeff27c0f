"""`tuneflow` command line: the whole flow (`run`), one stage at a time (what dvc.yaml calls), and the tools around them.

The stage commands are generated from the stage table (pipeline/table.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from cli import registry
from cli import reproduce as reproduce_command
from cli import serve as serve_command
from tuneflow import progress
from tuneflow.errors import TuneflowError

EXIT_OK, EXIT_UNEXPECTED = 0, 1


def build_parser() -> argparse.ArgumentParser:
    from pipeline.table import STAGES

    parser = argparse.ArgumentParser(prog="tuneflow", description="Fine-tune, gate, export and promote text classifiers.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; defaults if absent)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a params key, e.g. --set train.epochs=2 (repeatable)")

    run = commands.add_parser("run", parents=[overrides], help="run the whole pipeline as a Prefect flow (cached stages are skipped)")
    run.add_argument("--pipeline", help="a named overlay from pipelines.yaml on top of params.yaml (default: params.yaml alone)")
    run.add_argument("--pipelines-file", default="pipelines.yaml")
    deploy = commands.add_parser("deploy", help="serve Prefect deployments: one cron schedule per pipeline in pipelines.yaml")
    deploy.add_argument("--pipeline", action="append", dest="pipelines", metavar="NAME",
                        help="only this pipeline (repeatable; default: every pipeline with a schedule)")
    deploy.add_argument("--pipelines-file", default="pipelines.yaml")
    deploy.add_argument("--dry-run", action="store_true", help="print the deployments and exit instead of serving them")
    compare = commands.add_parser("compare", parents=[overrides], help="train several methods on the same split and compare them")
    compare.add_argument("--methods", required=True, help="comma-separated train.method names, e.g. lora,full,prefix")
    from cli import plan as plan_command

    plan_command.add_arguments(commands.add_parser("plan", parents=[overrides],
                                                   help="estimate every method's cost and quality on this data and machine; recommend one"))
    from cli import tune as tune_command

    tune_command.add_arguments(commands.add_parser("tune", parents=[overrides],
                                                   help="search train.method's hyperparameters (Optuna, on validation); write the best as a pipeline"))
    dvc_yaml = commands.add_parser("dvc-yaml", help="write dvc.yaml from the stage table (or --check that it is current)")
    dvc_yaml.add_argument("--output", default="dvc.yaml")
    dvc_yaml.add_argument("--check", action="store_true", help="exit 2 if the file differs from what the table generates")
    commands.add_parser("fingerprint", help="record the content hash of data.source (the `source` stage of dvc.yaml)")
    registry.add_parser(commands)
    serve_command.add_arguments(commands.add_parser("serve", help="HTTP inference from the registry's @champion (FastAPI, ONNX Runtime)"))
    reproduce_command.add_arguments(commands.add_parser("reproduce", help="re-run a registered version's exact params and data; compare metrics and predictions"))
    for stage in STAGES.values():
        command = commands.add_parser(stage.name, parents=[overrides], help=f"{stage.help} (dvc.yaml calls this)")
        for flag, (key, help_text) in stage.flags.items():
            command.add_argument(flag, dest="flags", action="append_const", const=key, default=[], help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    # No phoning home from the tools we drive (and no error lines on offline machines); users may opt in.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download floods logs
    # Prefect gives its temporary server 20 s to start; a busy 2-core machine can need more (measured: a run died at 44 s)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
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
    from tuneflow.config import load_params, parse_set, pipeline_params

    if args.command == "deploy":
        return deploy(args)
    if args.command == "dvc-yaml":
        from cli.dvc_yaml import write_dvc_yaml

        return write_dvc_yaml(load_params(args.params), Path(args.output), check=args.check)
    if args.command == "registry":
        return registry.run(args)
    if args.command == "serve":
        return serve_command.serve(args)
    if args.command == "reproduce":
        return reproduce_command.reproduce(args)
    if args.command == "fingerprint":
        from cli.dvc_yaml import write_fingerprint

        return write_fingerprint(load_params(args.params))
    command_line = ("--set", parse_set(args.overrides))
    if args.command == "run":
        run_name, params = pipeline_params(args.pipeline, args.params, args.pipelines_file, command_line)
        return run_pipeline(params, run_name)
    if args.command == "compare":
        return run_compare(load_params(args.params, command_line), args)
    if args.command == "plan":
        from cli import plan as plan_command

        return plan_command.plan(args, command_line)
    if args.command == "tune":
        from cli import tune as tune_command

        return tune_command.tune(args, command_line)

    from pipeline.runner import RunFacts, run_stage
    from pipeline.table import STAGES

    flags = {key: True for key in getattr(args, "flags", [])}
    params = load_params(args.params, command_line, ("command line", flags))
    with progress.stage(args.command):
        run_stage(STAGES[args.command], params, RunFacts.from_environment(Path(args.params).name))
    return EXIT_OK


def run_pipeline(params, run_name: str) -> int:
    from flows.retrain import retrain

    progress.say(f"[tuneflow] {run_name!r} through Prefect "
                 f"({os.environ.get('PREFECT_API_URL') or 'ephemeral local server'})")
    rows = retrain(params=params, run_name=run_name)
    print(progress.table(rows, f"tuneflow run · {run_name}"))
    return EXIT_OK


def deploy(args: argparse.Namespace) -> int:
    from flows.retrain import build_deployments, crash_runs_without_heartbeats

    deployments = build_deployments(args.pipelines_file, args.params, args.pipelines)
    for deployment in deployments:
        cron = ", ".join(f"{entry.schedule.cron} ({entry.schedule.timezone})" for entry in deployment.schedules or []) or "no schedule (run on demand)"
        print(f"{deployment.name}: {cron} → flow {deployment.flow_name} (pipeline={deployment.parameters['pipeline']})")
    if args.dry_run:
        return EXIT_OK
    from prefect import serve

    api = prefect_server()
    # the served runs (child processes) beat this often; a run that stops, its process killed, is marked Crashed
    heartbeat_s = int(os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"))
    crash_runs_without_heartbeats(heartbeat_s)
    progress.say(f"[tuneflow] serving {len(deployments)} deployment(s) on {api}; Ctrl-C stops")
    serve(*deployments)
    return EXIT_OK


def prefect_server() -> str:
    """The API URL of a running Prefect server: schedules fire only there (an ephemeral server runs no scheduler)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    from tuneflow.errors import InputError

    api = get_current_settings().api.url
    if not api:
        raise InputError("PREFECT_API_URL is not set: deployments served on Prefect's ephemeral server never fire their "
                         "schedules; start a server (`make server`) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise InputError(f"PREFECT_API_URL={api}: no Prefect server answers there ({type(failure).__name__}); "
                         "start one with `make server`")
    return api


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
