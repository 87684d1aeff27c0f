"""Scheduler lag and data-change-to-challenger time, on a real `prefect server start` with `tuneflow deploy`.

Two phases in a scratch folder, each with its own `tuneflow deploy` (the CPU is not shared between them):

1. `quick-cron`: the bbc-quick job on a per-minute cron, trained once by hand first. For each of `--runs` scheduled
   runs, the lag from the time it was scheduled for to the time its flow started, and its duration (cached stages).
2. `quick-watch`: the same job on a CSV copy of BBC with `watch: "* * * * *"`. After its first retrain registers v1,
   a text in the CSV is edited; the time from that edit to the new version in the registry is measured.

Prints a table and appends it to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/scheduling.py [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import publish  # noqa: E402
from tuneflow.artifacts import content_hash  # noqa: E402

BIN = Path(sys.executable).parent
QUICK = {"data.sample": 300, "train.epochs": 1, "evaluate.min_accuracy": 0.5, "evaluate.min_macro_f1": 0.5}


def start_server(home: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return server, {**env, "PREFECT_API_URL": url}
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("prefect server did not answer within 120 s")


def flow_runs(env: dict[str, str], deployment: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def versions(env: dict[str, str], model_name: str) -> int:
    from tuneflow.registry import Registry

    return len(Registry(env["MLFLOW_TRACKING_URI"]).client.search_model_versions(f"name='{model_name}'"))


def scheduled_lags(folder: Path, env: dict[str, str], runs: int) -> list[tuple[float, float, str]]:
    # trained once by hand first: the scheduled runs are then cached (well under a minute), so none waits for the one
    # before it under the deployment's concurrency limit and the lag is the scheduler's alone
    subprocess.run([str(BIN / "tuneflow"), "run", "--pipeline", "quick-cron"], cwd=folder, env=env, check=True, capture_output=True)
    serving = subprocess.Popen([str(BIN / "tuneflow"), "deploy", "--pipeline", "quick-cron"], cwd=folder, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60 * (runs + 8)
        while time.monotonic() < deadline:
            finished = [run for run in flow_runs(env, "quick-cron") if run.state and run.state.is_final()]
            if len(finished) >= runs:
                break
            time.sleep(5)
    finally:
        serving.terminate()
        serving.wait(60)
    finished = sorted(finished, key=lambda run: run.expected_start_time)[:runs]
    return [((run.start_time - run.expected_start_time).total_seconds(), (run.end_time - run.start_time).total_seconds(),
             run.state.name) for run in finished]


def wait_until(condition, what: str, timeout_s: float = 900, poll_s: float = 2) -> None:
    """Poll `condition`; a run that failed never registers its version, so the benchmark stops instead of waiting forever."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not reached within {timeout_s:.0f} s: {what}")
        time.sleep(poll_s)


def data_change_to_challenger(folder: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds from deploy to v1, seconds from the edit to v2)."""
    serving = subprocess.Popen([str(BIN / "tuneflow"), "deploy", "--pipeline", "quick-watch"], cwd=folder, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        wait_until(lambda: versions(env, "bench-watch") >= 1, "v1 of bench-watch registered")
        first = time.monotonic() - started
        # the check that registered v1 has ended, so the next one sees the edit (the scheduler's future runs are Scheduled)
        wait_until(lambda: not any(run.state and (run.state.is_running() or run.state.is_pending())
                                   for run in flow_runs(env, "quick-watch-on-data-change")),
                   "the first quick-watch-on-data-change run ended")
        import pandas as pd

        csv = folder / "bbc.csv"
        before = content_hash(csv)
        # every text: an edit to rows outside the pipeline's data.sample rightly retrains nothing (ingest reruns, finds
        # the same sample, and every later stage is cached); texts span lines, so edit parsed texts, not the file's lines
        frame = pd.read_csv(csv)
        frame["text"] += " (updated)"
        frame.to_csv(csv, index=False)
        edited = time.monotonic()
        assert content_hash(csv) != before, "the edit left bbc.csv as it was"
        wait_until(lambda: versions(env, "bench-watch") >= 2, "v2 of bench-watch registered", poll_s=1)
        return first, time.monotonic() - edited
    finally:
        serving.terminate()
        serving.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tuneflow-scheduling-"))
    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    subprocess.run([str(BIN / "tuneflow"), "ingest", "--set", "artifacts=bbc-export"], cwd=folder, check=True, capture_output=True)
    import pandas as pd

    pd.concat(pd.read_parquet(folder / "bbc-export" / "data" / f"{split}.parquet")[["text", "label"]]
              for split in ("train", "validation", "test")).to_csv(folder / "bbc.csv", index=False)
    pipelines = {"pipelines": {
        "quick-cron": {"source": "builtin:bbc", "method": "lora", "schedule": "* * * * *",
                       "set": {**QUICK, "promote.model_name": "bench-cron"}},
        "quick-watch": {"source": "bbc.csv", "method": "lora", "watch": "* * * * *",
                        "set": {**QUICK, "promote.model_name": "bench-watch"}}}}
    (folder / "pipelines.yaml").write_text(yaml.safe_dump(pipelines), encoding="utf-8")
    server, env = start_server(folder / ".prefect")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        lags = scheduled_lags(folder, env, args.runs)
        loads = [os.getloadavg()[0]]
        first, change = data_change_to_challenger(folder, env)
        loads.append(os.getloadavg()[0])
    finally:
        server.terminate()
        server.wait(60)
    rows = [f"| quick-cron run {index + 1} (per-minute cron) | {lag:.1f} s | {duration:.0f} s ({state}) |"
            for index, (lag, duration, state) in enumerate(lags)]
    rows.append(f"| quick-watch: deploy → v1 registered | | {first:.0f} s |")
    rows.append(f"| quick-watch: data edited → v2 (challenger) registered | | {change:.0f} s |")
    publish(f"\n## Scheduling on a real Prefect server ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"benchmarks/scheduling.py, load {loads[0]:.1f} / {loads[1]:.1f})\n\n"
            "`prefect server start` on loopback with its services, `tuneflow deploy --pipeline NAME` serving the deployment; "
            "the bbc-quick job (300 BBC rows, LoRA, 1 epoch). Lag: the flow run's start time minus the time it was scheduled "
            "for. The watch deployment checks the CSV's content hash every minute, so the data-change time includes up to a "
            "minute of waiting for the next check.\n\n"
            "| measurement | scheduler lag | time |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
