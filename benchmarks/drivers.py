"""The drivers' cost on the default job: Prefect and DVC over the same stage functions, side by side.

Each row runs in its own scratch project (the shipped params.yaml, pipelines.yaml and dvc.yaml, and its own
MLflow store), one after the other in one run of this script:

1. direct: the stage functions through the stage runner in one Python process (no orchestrator);
2. `tuneflow run` from nothing (Prefect, ephemeral server) — rows 1 and 2 alternated `--repeats` times;
3. `tuneflow run` again: the first run promoted v1, so the gate runs once more against that champion;
4. `tuneflow run` a third time, nothing changed: ingest → evaluate come from the cache, champion and promote run;
5. `dvc repro` from nothing, 6. again (the gate against the new champion), then 7. a no-op `dvc repro`.

Wall time is the whole command, interpreter start included. "Outside the stages" is wall time minus the
stages' own durations (the `✔ <stage> done in` lines): the driver's cost without the run-to-run noise of
training. Prints a table and appends it to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/drivers.py [--repeats 2] [--log FILE]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import publish  # noqa: E402

BIN = Path(sys.executable).parent
DIRECT = """
from pipeline.runner import run_stage
from pipeline.table import STAGES
from tuneflow import progress
from tuneflow.config import load_params

params = load_params("params.yaml")
for stage in STAGES.values():
    with progress.stage(stage.name):
        run_stage(stage, params)
"""
STAGE_DONE = re.compile(r"✔ (\w+) (?:done in ([\d.]+)s|cached)")


def project(root: Path, name: str) -> tuple[Path, dict[str, str]]:
    folder = root / name
    folder.mkdir()
    for file in ("params.yaml", "pipelines.yaml", "dvc.yaml"):
        shutil.copy(REPO / file, folder / file)
    for package in ("tuneflow", "tasks"):  # dvc.yaml's code deps are paths in the project
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "PREFECT_HOME": str(folder / ".prefect"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return folder, env


LOG: list[str] = []


def timed(folder: Path, env: dict[str, str], *command: str) -> tuple[float, float, str]:
    """(wall seconds, seconds spent inside the stages, output)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    output = done.stdout + done.stderr
    LOG.append(f"$ {' '.join(command[:2])}  # in {folder.name}/, {wall:.1f} s\n{output}")
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{output[-3000:]}")
    inside = sum(float(seconds) for _, seconds in STAGE_DONE.findall(output) if seconds)
    return wall, inside, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="direct and Prefect runs, alternated (training time is noisy)")
    parser.add_argument("--log", type=Path, help="also write every command's output here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tuneflow-drivers-"))
    rows: list[tuple[str, float, float]] = []
    direct, prefect = [], []
    for repeat in range(1, args.repeats + 1):
        folder, env = project(scratch, f"direct-{repeat}")
        direct.append(timed(folder, env, sys.executable, "-c", DIRECT)[:2])
        rows.append((f"direct: the stage functions, one process (#{repeat})", *direct[-1]))
        folder, env = project(scratch, f"prefect-{repeat}")
        prefect.append(timed(folder, env, str(BIN / "tuneflow"), "run")[:2])
        rows.append((f"tuneflow run (Prefect), from nothing (#{repeat})", *prefect[-1]))
    rows.append(("tuneflow run again: the gate against the new champion v1", *timed(folder, env, str(BIN / "tuneflow"), "run")[:2]))
    cached_wall, inside, output = timed(folder, env, str(BIN / "tuneflow"), "run")
    cached = [name for name, seconds in STAGE_DONE.findall(output) if not seconds]
    rows.append((f"tuneflow run a third time, nothing changed ({len(cached)} stages cached)", cached_wall, inside))

    folder, env = project(scratch, "dvc")
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=folder, env=env, check=True)
    rows.append(("dvc repro, from nothing", *timed(folder, env, str(BIN / "dvc"), "repro")[:2]))
    rows.append(("dvc repro again: the gate against the new champion v1", *timed(folder, env, str(BIN / "dvc"), "repro")[:2]))
    noop_wall, inside, output = timed(folder, env, str(BIN / "dvc"), "repro")
    ran = ", ".join(re.findall(r"Running stage '(\w+)'", output))
    rows.append((f"dvc repro a third time, nothing changed (stages run: {ran})", noop_wall, inside))

    def median(runs: list[tuple[float, float]], outside: bool = False) -> float:
        return statistics.median(wall - inside if outside else wall for wall, inside in runs)

    wall_ratio = median(prefect) / median(direct) - 1
    outside = median(prefect, outside=True) - median(direct, outside=True)
    lines = [
        "",
        f"## Drivers on the default job: Prefect and DVC vs the stage functions — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"`python benchmarks/drivers.py --repeats {args.repeats}`; shipped params.yaml (BBC, lora, 2 epochs); {os.cpu_count()} cores; "
        "Prefect's ephemeral server; each row a fresh scratch project with its own MLflow store, direct and Prefect alternated.",
        "",
        "| run | wall (s) | inside the stages (s) | outside the stages (s) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {wall:.1f} | {inside:.1f} | {wall - inside:.1f} |" for name, wall, inside in rows]
    lines += [
        "",
        f"Prefect over direct, medians: wall {wall_ratio:+.1%} (target ≤ +10 %); outside the stages {outside:+.1f} s = "
        f"{outside / median(direct):+.1%} of the direct wall time. Fully cached `tuneflow run`: {cached_wall:.1f} s "
        f"(target ≤ 30 s). No-op `dvc repro`: {noop_wall:.1f} s (target ≤ 5 s).",
        "",
    ]
    publish("\n".join(lines))
    if args.log:
        args.log.write_text("\n".join(LOG), encoding="utf-8")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
