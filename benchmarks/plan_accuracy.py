"""How close `tuneflow plan`'s estimates come to real training (not a test; `flock`-wrap it on shared machines).

On one data set and one set of settings, for each method in turn: `tuneflow plan --methods <method>` (its few timed
calibration steps), then at once `tuneflow train` with that method (the real run, its own process), so that the
estimate and the measurement see the same load on a shared machine. Compares time per epoch (train_time_s /
epochs_run from train_summary.json), peak memory (the training process's VmHWM), trainable parameters and the saved
weights. Prints a table and appends it to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/plan_accuracy.py [--sample 2000] [--epochs 1] [--methods lora,full,prefix,ia3]
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

from benchmarks.common import MR, publish  # noqa: E402

TUNEFLOW = [sys.executable, "-m", "cli"]
TARGET = 0.30  # |estimate / measured - 1| for time per epoch and peak memory


def tuneflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([*TUNEFLOW, "--params", str(REPO / "params.yaml"), *args], cwd=REPO, capture_output=True,
                            text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise SystemExit(f"tuneflow {' '.join(args[:1])} failed ({result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
    return result


def ratio(estimate: float, measured: float) -> float:
    return estimate / measured if measured else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(MR))
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--methods", default="lora,full,prefix,ia3")
    args = parser.parse_args()
    from tuneflow.methods import METHODS

    methods = args.methods.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="tuneflow-plan-accuracy-"))
    common = ["--set", f"artifacts={scratch / 'artifacts'}", "--set", f"data.source={args.source}",
              "--set", f"data.sample={args.sample}", "--set", f"train.epochs={args.epochs}"]
    started = time.perf_counter()
    load_before = os.getloadavg()
    try:
        tuneflow("ingest", *common, cwd=scratch)
        tuneflow("validate", *common, cwd=scratch)
        rows = []
        for method in methods:
            planned = tuneflow("plan", *common, "--methods", method, cwd=scratch)
            plan = json.loads((scratch / "artifacts" / "plan" / "plan.json").read_text())
            estimate = plan["estimates"][0]
            print(planned.stdout)
            # the real run right after its calibration, at the learning rate `tuneflow compare` uses; one attempt, as
            # planned (a collapse restart would add a second training of epochs + 1 to the time of this one)
            tuneflow("train", *common, "--set", f"train.method={method}", "--set",
                     f"train.learning_rate={METHODS[method].suggested_lr}", "--set", "train.collapse_restart=false",
                     cwd=scratch)
            summary = json.loads((scratch / "artifacts" / "model" / "train_summary.json").read_text())
            rows.append({"method": method, "estimate": estimate, "plan": plan, "summary": summary,
                         "measured_epoch_s": summary["train_time_s"] / summary["epochs_run"]})
            print(f"{method}: estimated {estimate['time_per_epoch_s']:.1f} s/epoch, {estimate['peak_memory_mb']:.0f} MB; "
                  f"measured {rows[-1]['measured_epoch_s']:.1f} s/epoch, {summary['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()
    wall = time.perf_counter() - started
    first = rows[0]
    data, machine = first["plan"]["data"], first["plan"]["machine"]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## Planner estimates vs real training — {stamp}", "",
             f"`python benchmarks/plan_accuracy.py --sample {args.sample} --epochs {args.epochs:g} --methods {args.methods}`; "
             f"{Path(args.source).name}, {data['train_rows']:,} training / {data['validation_rows']:,} validation rows after the gate, "
             f"{first['plan']['settings']['base']}, batch {first['plan']['settings']['batch_size']}, "
             f"bf16 {first['plan']['settings']['bf16']}, max_length {first['summary']['max_length']}; {machine['device']}, "
             f"{platform.machine()}. Per method: `tuneflow plan --methods <m>` ({first['plan']['settings']['calibration_steps']} "
             "timed steps at each of two padded lengths), then at once `tuneflow train` with that method in its own process "
             "(one attempt: the collapse restart off). "
             f"Load average before / after: {load_before[0]:.1f} / {load_after[0]:.1f} (the cores are shared with other jobs). "
             f"{wall / 60:.0f} minutes in all.", "",
             "| method | time/epoch est. (s) | measured (s) | ratio | peak memory est. (MB) | measured (MB) | ratio | "
             "trainable est. / measured | weights est. / measured (MB) | planning (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    within = 0
    for row in rows:
        estimate, summary = row["estimate"], row["summary"]
        time_ratio = ratio(estimate["time_per_epoch_s"], row["measured_epoch_s"])
        memory_ratio = ratio(estimate["peak_memory_mb"], summary["peak_rss_mb"])
        ok = abs(time_ratio - 1) <= TARGET and abs(memory_ratio - 1) <= TARGET
        within += ok
        lines.append(f"| {row['method']} | {estimate['time_per_epoch_s']:.1f} | {row['measured_epoch_s']:.1f} | {time_ratio:.2f} | "
                     f"{estimate['peak_memory_mb']:,.0f} | {summary['peak_rss_mb']:,.0f} | {memory_ratio:.2f} | "
                     f"{estimate['trainable_params']:,} / {summary['trainable_params']:,} | "
                     f"{estimate['artifact_mb']:.3g} / {summary['weights_bytes'] / 2**20:.3g} | {row['plan']['planning_s']:.0f} |")
    lines += ["", f"Within ±{TARGET:.0%} on both time per epoch and peak memory: {within} of {len(rows)} methods "
              f"(target: at least 3).", ""]
    publish("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
