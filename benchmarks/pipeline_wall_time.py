"""Wall time of the default job (`tuneflow run`, what `make run` does after setup) and a TF-IDF baseline.

Runs in a scratch directory with its own MLflow store so the repository's registry is untouched.
The TF-IDF + logistic-regression baseline is the one the evaluation gate fits on the same train split and
scores on the same test rows (metrics.json). Prints a table and appends it to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/pipeline_wall_time.py [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import publish  # noqa: E402

TUNEFLOW = Path(sys.executable).parent / "tuneflow"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--log", type=Path, help="also write the run's own output (stdout, then stderr) here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tuneflow-bench-"))
    for name in ("params.yaml", "pipelines.yaml"):
        shutil.copy(REPO / name, scratch / name)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}", "PREFECT_HOME": str(scratch / ".prefect")}
    command = [str(TUNEFLOW), "run"] + [f"--set={pair}" for pair in args.overrides]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if args.log:
        args.log.write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        sys.exit(f"tuneflow run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    artifacts = scratch / "artifacts"
    metrics = json.loads((artifacts / "eval" / "metrics.json").read_text())
    summary = json.loads((artifacts / "model" / "train_summary.json").read_text())
    gated = artifacts / "validation" / "data"  # the splits the model was trained and tested on
    card = json.loads((gated / "data_card.json").read_text())
    baseline = metrics["baseline"]
    verdict = json.loads((artifacts / "eval" / "verdict.json").read_text())
    latency = metrics["latency_ms"]
    rows = [
        ("default job wall time (tuneflow run, incl. Prefect start)", f"{wall:.0f} s ({wall / 60:.1f} min)", "≤ 600 s (stretch 300 s)"),
        ("  of which training", f"{summary['train_time_s']:.0f} s, {summary['epochs_run']:g} epochs, {summary['train_samples_per_s']:.1f} samples/s", ""),
        (f"tuneflow test macro-F1 (ONNX, {summary['method']})", f"{metrics['macro_f1']:.4f}", "≥ 0.95"),
        ("tuneflow test accuracy", f"{metrics['accuracy']:.4f}", ""),
        ("TF-IDF + logistic regression macro-F1 (same split)", f"{baseline['macro_f1']:.4f} (Δ model − baseline "
         f"{baseline['macro_f1_difference']['value']:+.4f}, 95 % CI {baseline['macro_f1_difference']['low']:+.4f} to "
         f"{baseline['macro_f1_difference']['high']:+.4f})", "reference"),
        ("evaluation gate", f"{'passed' if verdict['passed'] else 'FAILED'}: {verdict['summary']}", ""),
        ("batch-1 latency P50 / P95 / P99", f"{latency['p50']:.1f} / {latency['p95']:.1f} / {latency['p99']:.1f} ms", ""),
        ("data", f"train {card['counts']['train']}, validation {card['counts']['validation']}, test {card['counts']['test']} "
                 f"({card.get('gate_removed', 0)} removed by the data gate)", ""),
    ]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = (f"## Default pipeline wall time — {stamp}\n\nMachine: {os.cpu_count()} cores, {platform.machine()}, "
              f"torch threads default, bf16 {'on' if summary['bf16'] else 'off'}; command `{' '.join(['tuneflow', 'run'] + args.overrides)}`\n\n")
    table = "| measure | value | target |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows) + "\n"
    publish("\n" + header + table)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
