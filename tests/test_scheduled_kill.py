"""SIGKILL a `tuneflow deploy` while its deployment's run trains: the server marks the dead run Crashed (Prefect's
zombie detection, from heartbeats), so the deployment's one concurrency slot comes free; a restarted `tuneflow deploy`
runs the next trigger to Completed, with whole artifacts and the registry without a half-promotion."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pytest

from conftest import start_prefect_server
from test_kill import Tuneflow, check_whole, tiny_project
from tuneflow import artifacts as a
from tuneflow.registry import CHAMPION, LOCK_SUFFIX, PROMOTION_TAG, Registry

MODEL_NAME = "scheduled-kill-tiny"
DEPLOYMENT = "tuneflow-scheduled/tiny"


def serve_tiny(folder: Path, env: dict[str, str]) -> Tuneflow:
    """`tuneflow deploy --pipeline tiny`: the runs it starts are its children, in its process group."""
    return Tuneflow(folder, env, ["deploy", "--pipeline", "tiny"])


def wait_until(client, flow_run_id, done: Callable, timeout_s: float = 900.0):
    deadline = time.monotonic() + timeout_s
    while True:
        flow_run = client.read_flow_run(flow_run_id)
        if done(flow_run) or time.monotonic() > deadline:
            return flow_run
        time.sleep(1)


@pytest.mark.slow
def test_a_deployed_run_killed_mid_training_neither_blocks_nor_corrupts_the_next_run(tiny_model, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import ZOMBIE_AUTOMATION

    folder = tmp_path
    tiny_project(folder, tiny_model, MODEL_NAME)
    (folder / "pipelines.yaml").write_text("pipelines:\n  tiny:\n    description: tiny topics\n")
    # with its services: the scheduler, the lease repossessor and the automations (triggers, actions) run
    server, server_env = start_prefect_server(folder / ".prefect", services=True)
    env = {**server_env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    root = folder / "artifacts" / a.PIPELINES / "tiny"
    timings = []
    serving = None
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            def trigger():
                deployment = client.read_deployment_by_name(DEPLOYMENT)
                return client.create_flow_run_from_deployment(deployment.id).id

            def deployed() -> bool:
                try:
                    client.read_deployment_by_name(DEPLOYMENT)
                    return True
                except Exception:  # ObjectNotFound until `tuneflow deploy` has registered it
                    return False

            started = time.monotonic()
            serving = serve_tiny(folder, env)
            assert serving.wait_for(deployed, timeout_s=600), serving.output[-3000:]
            killed_id = trigger()
            assert serving.wait_for(lambda: "[tuneflow] ▶ train" in serving.output, timeout_s=600), serving.output[-3000:]
            assert serving.kill(), serving.output[-3000:]
            timings.append(("deploy, trigger, killed in train", time.monotonic() - started))
            assert "✔ train done" not in serving.output  # killed mid-training, not after it
            check_whole(root, dict.fromkeys(a.OUTPUT_FOLDERS), "killed in train")
            assert client.read_flow_run(killed_id).state.is_running()  # nobody told the server: it still holds the slot

            started = time.monotonic()
            serving = serve_tiny(folder, env)
            assert serving.wait_for(deployed, timeout_s=600), serving.output[-3000:]
            next_id = trigger()
            next_run = wait_until(client, next_id, lambda run: run.state.is_final())
            timings.append(("restarted deploy, next run", time.monotonic() - started))
            killed = client.read_flow_run(killed_id)
            (killed_pipeline,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[killed_id])))
            automation = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    finally:
        if serving is not None:
            serving.kill()
        server.terminate()
        server.wait(30)
    print("\n" + "\n".join(f"{name}: {seconds:.1f} s" for name, seconds in timings))

    assert next_run.state.is_completed(), (next_run.state, serving.output[-3000:])
    # the dead run and its pipeline subflow were marked Crashed by the server, and only then did the next run start
    assert len(automation) == 1
    assert killed.state.is_crashed() and "No heartbeat" in killed.state.message, killed.state
    assert killed_pipeline.state.is_crashed(), killed_pipeline.state
    assert next_run.start_time >= killed.state.timestamp

    assert not [entry.name for entry in root.iterdir() if a.LEFTOVER.match(entry.name)]
    for name in a.OUTPUT_FOLDERS:
        assert (root / name / a.PARAMS).exists(), name
    registry = Registry(env["MLFLOW_TRACKING_URI"])
    versions = registry.versions(MODEL_NAME)
    assert versions
    for version in versions:  # no version without its outcome
        outcome = version.tags.get(PROMOTION_TAG, "")
        assert outcome == "done" or outcome.startswith("failed"), f"v{version.version}: promotion tag {outcome!r}"
    champion = registry.by_alias(MODEL_NAME, CHAMPION)
    assert champion.tags.get(PROMOTION_TAG) == "done"
    assert MODEL_NAME + LOCK_SUFFIX not in [model.name for model in registry.client.search_registered_models()]
    decision = json.loads((root / a.PROMOTION / a.DECISION).read_text())
    assert decision["promoted"] and decision["version"] == champion.version


@pytest.mark.slow  # a real server with its services: ~40 s
def test_a_deployed_run_stranded_in_pending_is_marked_crashed(tmp_path):
    """A runner killed after it took a run (Pending holds the deployment's slot) but before starting it sends nothing
    more; the same automation crashes it after the window. Runs without the deployments' tag are left alone."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Pending

    from flows.retrain import DEPLOYED_TAG, crash_runs_without_heartbeats

    @flow
    def stranded():
        pass

    server, env = start_prefect_server(tmp_path / ".prefect", services=True)
    try:
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            created = crash_runs_without_heartbeats(heartbeat_s=5)  # a 15 s window
            assert crash_runs_without_heartbeats(heartbeat_s=5).id == created.id  # unchanged: reused, not re-created
            deployed, other = (client.create_flow_run(stranded, tags=tags).id for tags in ([DEPLOYED_TAG], ["other"]))
            for flow_run_id in (deployed, other):
                client.set_flow_run_state(flow_run_id, Pending(), force=True)
            crashed = wait_until(client, deployed, lambda run: run.state.is_crashed(), timeout_s=120)
            left = client.read_flow_run(other)
    finally:
        server.terminate()
        server.wait(30)
    assert crashed.state.is_crashed(), crashed.state
    assert left.state.is_pending(), left.state
