"""SIGKILL anywhere: a registry lock whose holder died is broken at once, and `tuneflow run` killed at points
spread over every stage leaves each artifact folder whole (old or new) and the registry without a half-promotion."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO, TUNEFLOW, copy_repo_files, topic_frame, write_params
from pipeline.table import STAGES
from tuneflow import artifacts as a
from tuneflow.registry import CHAMPION, LOCK_SUFFIX, PROMOTION_TAG, Registry, RegistryError

HOLD_THE_LOCK = """
import sys, time
from tuneflow.registry import Registry
with Registry().lock("m"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_lock_whose_holder_was_killed_is_broken_at_once_and_a_live_or_remote_one_is_not(workdir):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        registry = Registry()
        tags = registry.registered("m" + LOCK_SUFFIX).tags
        assert tags["pid"] == str(holder.pid) and tags["host"] and f"pid {holder.pid}" in tags["holder"]
        with pytest.raises(RegistryError, match="m is locked by another promotion"):  # alive: waited for, not broken
            with registry.lock("m", wait_s=1.0):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with registry.lock("m", wait_s=30.0):  # dead on this host: broken at once, long before LOCK_STALE_S (600 s)
        assert registry.registered("m" + LOCK_SUFFIX).tags["pid"] == str(os.getpid())

    # a holder on another host, or a lock from before host and pid were recorded, can only go stale
    for foreign in ({"host": "elsewhere", "pid": str(holder.pid)}, {}):
        registry.client.create_registered_model("m" + LOCK_SUFFIX, tags={"holder": "old", "since": str(time.time()), **foreign})
        with pytest.raises(RegistryError, match=r"locked by another promotion \(old\)"):
            with registry.lock("m", wait_s=0.5):
                pass
        registry.client.delete_registered_model("m" + LOCK_SUFFIX)


# --- kill anywhere -------------------------------------------------------------------------------------------

MODEL_NAME = "kill-tiny"


@dataclass(frozen=True)
class KillPoint:
    stage: str
    when: str  # a line of the run's output, "db:" + a registry write (REGISTRY_QUERIES) this run makes, or "fs:" + a glob
    delay_s: float = 0.0


# Spread over all six stages. Anchored on what the run prints or writes, not on wall time: each run skips what an
# earlier killed run finished (Prefect's cache), so a point lands in its stage whatever the machine's speed. Export of
# the tiny model can finish within a second or two, so export and evaluate are killed once a file they write midway is
# in their staging folder.
KILL_POINTS = [
    KillPoint("ingest", "▶ ingest …", 0.3),
    KillPoint("validate", "▶ validate …", 1.0),
    KillPoint("train", "▶ train …", 4.0),
    KillPoint("export", "fs:.export.staging.*/*.onnx"),
    KillPoint("evaluate", "fs:.eval.staging.*/robustness.parquet"),  # written midway: slices, latency, champion follow
    KillPoint("promote", "db:lock"),  # it holds the registry lock
    KillPoint("promote", "db:version"),  # the new version is registered
    KillPoint("promote", "db:champion"),  # @champion points at it
]


REGISTRY_QUERIES = {  # what the run's promote writes, in order, read straight from the registry's SQLite file
    "lock": "SELECT creation_time FROM registered_models WHERE name = :name || :lock",
    "version": "SELECT MAX(version) FROM model_versions WHERE name = :name",
    "champion": "SELECT version FROM registered_model_aliases WHERE name = :name AND alias = :champion",
}


def registry_state(database: Path, what: str) -> list | None:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=0.05) as db:
            return db.execute(REGISTRY_QUERIES[what], {"name": MODEL_NAME, "lock": LOCK_SUFFIX, "champion": CHAMPION}).fetchall()
    except sqlite3.OperationalError:  # busy while the run writes
        return None


class Tuneflow:
    """A `tuneflow` command in its own process group (with the processes it starts), its output read as it comes."""

    def __init__(self, folder: Path, env: dict[str, str], args: list[str]):
        self.lines: list[str] = []
        self.process = subprocess.Popen([str(TUNEFLOW), *args], cwd=folder, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, seen: Callable[[], bool], timeout_s: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if seen():
                return True
            time.sleep(0.005)
        return False

    def kill(self) -> bool:
        """SIGKILL the run and any process it started; False if it had already ended."""
        alive = self.process.poll() is None
        with_children = os.getpgid(self.process.pid)
        os.killpg(with_children, signal.SIGKILL)
        self.process.wait()
        self.reader.join(10)
        return alive

    def finish(self) -> int:
        try:
            code = self.process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


class Run(Tuneflow):
    """`tuneflow run --set …`."""

    def __init__(self, folder: Path, env: dict[str, str], *sets: str):
        super().__init__(folder, env, ["run", *(arg for pair in sets for arg in ("--set", pair))])


def stage_folders(root: Path) -> dict[str, str | None]:
    return {name: a.content_hash(root / name) for name in a.OUTPUT_FOLDERS}


def check_whole(root: Path, before: dict[str, str | None], point: str) -> None:
    """Each stage folder is the version it was before the kill, or a new complete one (params.json, the runner's last
    write, is in it), or — killed inside the swap — missing with the old version aside for the next run to restore."""
    for name in a.OUTPUT_FOLDERS:
        now = a.content_hash(root / name)
        if now is None:
            asides = [a.content_hash(entry) for entry in root.glob(f".{name}.old.*")]
            assert before[name] is None or asides == [before[name]], f"{point}: {name}/ lost its old version"
        elif now != before[name]:
            record = json.loads((root / name / a.PARAMS).read_text())
            assert record["stage"] == next(s.name for s in STAGES.values() if s.output == name), f"{point}: {name}/"


def last_stage_started(output: str) -> str | None:
    started = [line.split("▶ ")[1].split(" ")[0] for line in output.splitlines() if "[tuneflow] ▶ " in line]
    return started[-1] if started else None


def tiny_project(folder: Path, tiny_model: Path, model_name: str) -> None:
    """topics.csv and a params.yaml that trains the tiny BERT for one epoch, checkpoints every second and lets every
    candidate through the gate (a margin of 1 in the champion comparison, so killed runs move @champion too)."""
    topic_frame(20).to_csv(folder / "topics.csv", index=False)
    write_params(folder, data={"source": "topics.csv"}, model={"base": str(tiny_model), "max_length": 32},
                 train={"method": "full", "epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "save_every_s": 1},
                 evaluate={"latency_warmup": 2, "min_accuracy": 0.0, "min_macro_f1": 0.0, "pytorch_reference": False,
                           "throughput_texts": 32, "non_inferiority_margin": 1.0},
                 promote={"model_name": model_name})


@pytest.mark.slow
def test_tuneflow_run_killed_anywhere_leaves_whole_artifacts_and_no_half_promotion(tiny_model, tmp_path, prefect_server):
    folder = tmp_path
    copy_repo_files(folder, "pipelines.yaml")
    tiny_project(folder, tiny_model, MODEL_NAME)
    database = folder / "mlflow.db"
    env = {**prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{database}"}
    root = folder / "artifacts"
    timings = []

    started = time.monotonic()
    first = Run(folder, env)
    assert first.finish() == 0, first.output[-3000:]
    timings.append(("complete run", time.monotonic() - started))
    assert all(stage_folders(root).values())

    # the killed runs and the final one change data.seed (ingest's params; the same split) and train.seed: every stage
    # has new work, and the new model is promoted over v1
    changed = ("data.seed=7", "train.seed=7")
    for point in KILL_POINTS:
        before = stage_folders(root)
        started = time.monotonic()
        if point.when.startswith("db:"):
            what = point.when[3:]
            at_start = registry_state(database, what)
            run = Run(folder, env, *changed)
            reached = run.wait_for(lambda: registry_state(database, what) not in (None, at_start, [(None,)], []))
        elif point.when.startswith("fs:"):
            run = Run(folder, env, *changed)
            reached = run.wait_for(lambda: any(root.glob(point.when[3:])))
        else:
            run = Run(folder, env, *changed)
            reached = run.wait_for(lambda: any(point.when in line for line in run.lines))
            time.sleep(point.delay_s)
        alive = run.kill()
        assert reached and alive, f"{point.when}: the run ended before its kill point\n{run.output[-3000:]}"
        timings.append((f"killed in {point.stage} ({point.when})", time.monotonic() - started))
        assert last_stage_started(run.output) == point.stage, f"{point.when}: killed in {last_stage_started(run.output)}"
        check_whole(root, before, point.when)

    started = time.monotonic()
    final = Run(folder, env, *changed)
    assert final.finish() == 0, final.output[-3000:]
    timings.append(("final run", time.monotonic() - started))
    print("\n" + "\n".join(f"{name}: {seconds:.1f} s" for name, seconds in timings))
    assert not [entry.name for entry in root.iterdir() if a.LEFTOVER.match(entry.name)]  # cleaned by the next run
    for name in a.OUTPUT_FOLDERS:
        assert (root / name / a.PARAMS).exists(), name
    assert json.loads((root / a.DATA / a.PARAMS).read_text())["data"]["seed"] == 7

    registry = Registry(env["MLFLOW_TRACKING_URI"])
    versions = registry.versions(MODEL_NAME)
    assert len(versions) >= 2
    for version in versions:  # no version without its outcome
        outcome = version.tags.get(PROMOTION_TAG, "")
        assert outcome == "done" or outcome.startswith("failed"), f"v{version.version}: promotion tag {outcome!r}"
    champion = registry.by_alias(MODEL_NAME, CHAMPION)
    assert champion.version != "1"
    history = registry.history(MODEL_NAME)
    assert any(entry["alias"] == CHAMPION and entry["to_version"] == champion.version for entry in history), history
    assert MODEL_NAME + LOCK_SUFFIX not in [model.name for model in registry.client.search_registered_models()]
    decision = json.loads((root / a.PROMOTION / a.DECISION).read_text())
    assert decision["version"] == champion.version and "failed" not in decision
