"""Peak memory and time of `tuneflow ingest` and `tuneflow validate` on a large CSV (not a test).

    flock /tmp/tuneflow-heavy.lock .venv/bin/python benchmarks/ingest_memory.py [--size-mb 1024] [--sample 200000]

Writes a CSV of about --size-mb in a scratch folder under /tmp (deleted afterwards): review-like texts made of
2–6 MR polarity snippets, 3 classes, and four columns ingest does not use (id, created_at, channel, notes).
Each command runs as its own process in a scratch project (the shipped params.yaml, data.source overridden);
its peak RSS is the child's ru_maxrss (os.wait4), beside the sampled PSS of its process tree. Rows:
1. `tuneflow ingest` on the whole file (target: peak RSS ≤ 1.5 GB);
2. `tuneflow validate` on that output (target: peak RSS ≤ 1.5 GB), stopped by a watchdog past --validate-limit-gb
   or --validate-limit-s;
3. `tuneflow ingest` with data.sample=--sample, then `tuneflow validate` on it (--sample 0 skips this row).
Prints a table and a line on whether the targets are met, and appends both to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MR, publish  # noqa: E402

TUNEFLOW = Path(sys.executable).parent / "tuneflow"
CHANNELS = ["web", "app", "email", "store", "partner"]
TARGET_GB = 1.5


def write_csv(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Rows until the file reaches `target_bytes`; returns the row count."""
    mr = pd.read_csv(MR)
    snippets, sentiments = mr["text"].tolist(), mr["label"].tolist()
    rng = random.Random(seed)
    start = datetime.datetime(2024, 1, 1)
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "created_at", "text", "label", "channel", "notes"])
        while handle.tell() < target_bytes:
            batch = []
            for _ in range(10_000):
                picked = rng.sample(range(len(snippets)), rng.randint(2, 6))
                moods = {sentiments[index] for index in picked}
                label = moods.pop() if len(moods) == 1 else "mixed"
                created = start + datetime.timedelta(seconds=rng.randrange(30_000_000))
                notes = f"ticket {rng.randrange(10**6)} routed to queue {rng.choice('ABCDE')}; agent left no comment"
                batch.append([rows, created.isoformat(), " ".join(snippets[index] for index in picked), label,
                              rng.choice(CHANNELS), notes])
                rows += 1
            writer.writerows(batch)
    return rows


def measured(command: list[str], cwd: Path, limit_gb: float | None = None, limit_s: float | None = None) -> dict:
    """Run `command`: wall time, exit code, the child's peak RSS (ru_maxrss: the largest single process, forked
    workers included), the peak PSS of its whole process tree (sampled each second; PSS counts pages that forked
    workers share once), and whether the watchdog stopped it (over `limit_gb` of PSS, or `limit_s`)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finished, stopped, tree_peak = threading.Event(), [], [0.0]

    def watch() -> None:  # never child.poll(): it would reap the child before os.wait4 reads its usage
        root = psutil.Process(child.pid)
        while not finished.wait(1.0):
            try:
                pss = sum(process.memory_full_info().pss for process in [root, *root.children(recursive=True)]) / 2**30
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            tree_peak[0] = max(tree_peak[0], pss)
            if limit_gb and pss > limit_gb:
                stopped.append(f"memory passed {limit_gb:g} GB")
            elif limit_s and time.perf_counter() - started > limit_s:
                stopped.append(f"still running after {limit_s:g} s")
            if stopped:
                for process in [*root.children(recursive=True), root]:
                    process.kill()
                return

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    finished.set()
    watchdog.join()
    return {"wall_s": time.perf_counter() - started, "peak_gb": usage.ru_maxrss * 1024 / 2**30, "tree_gb": tree_peak[0],
            "rc": child.returncode, "stopped": stopped[0] if stopped else None, "output": output}


def project(scratch: Path, name: str) -> Path:
    folder = scratch / name
    folder.mkdir()
    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    return folder


def stage(folder: Path, name: str, source: Path, *overrides: str, **limits) -> dict:
    sets = [f"--set=data.source={source}", "--set=validation.fix=false", *(f"--set={pair}" for pair in overrides)]
    result = measured([str(TUNEFLOW), name, *sets], folder, **limits)
    print(f"{name} {' '.join(overrides)}: rc {result['rc']}, {result['wall_s']:.0f} s, peak RSS {result['peak_gb']:.2f} GB, "
          f"tree PSS {result['tree_gb']:.2f} GB"
          f"{', ' + result['stopped'] if result['stopped'] else ''}", flush=True)
    if result["rc"] not in (0, 3) and not result["stopped"]:
        print(result["output"][-3000:])
    report = folder / "artifacts" / "validation" / "report.json"
    if name == "validate" and result["rc"] == 3 and report.exists():
        result["failed"] = [check["name"] for check in json.loads(report.read_text())["checks"] if check["gating"] and not check["passed"]]
    return result


def cell(result: dict) -> tuple[str, str, str]:
    """wall, peak RSS, peak tree PSS as table cells."""
    if result["stopped"]:
        return f"stopped: {result['stopped']} ({result['wall_s']:.0f} s)", f"≥ {result['peak_gb']:.2f}", f"≥ {result['tree_gb']:.2f}"
    outcome = {0: "", 3: f" (gate failed, exit 3: {', '.join(result.get('failed', []))})"}.get(result["rc"], f" (exit {result['rc']})")
    return f"{result['wall_s']:.0f}{outcome}", f"{result['peak_gb']:.2f}", f"{result['tree_gb']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--sample", type=int, default=200_000, help="data.sample for the ingest + validate row (0: skip it)")
    parser.add_argument("--validate-limit-gb", type=float, default=6.0)
    parser.add_argument("--validate-limit-s", type=float, default=3600.0)
    parser.add_argument("--csv", type=Path, help="measure this CSV, written by an earlier run's write_csv at the same "
                        "--size-mb (seed 0: the same file), instead of writing it again")
    parser.add_argument("--no-publish", action="store_true", help="print the table only")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tuneflow-ingest-memory-", dir="/tmp"))
    try:
        source = args.csv or scratch / "reviews.csv"
        started = time.perf_counter()
        rows = (sum(1 for _ in source.open("rb")) - 1) if args.csv else write_csv(source, args.size_mb * 2**20)
        size_gb = source.stat().st_size / 2**30
        print(f"{'read' if args.csv else 'wrote'} {source} ({size_gb:.2f} GB, {rows:,} rows) in {time.perf_counter() - started:.0f} s", flush=True)
        whole = project(scratch, "whole")
        ingested = stage(whole, "ingest", source)
        card = json.loads((whole / "artifacts" / "data" / "data_card.json").read_text()) if ingested["rc"] == 0 else {}
        gate = stage(whole, "validate", source, limit_gb=args.validate_limit_gb, limit_s=args.validate_limit_s)
        if args.sample:
            sampled = project(scratch, "sampled")
            ingested_sample = stage(sampled, "ingest", source, f"data.sample={args.sample}")
            gate_sample = stage(sampled, "validate", source, f"data.sample={args.sample}",
                                limit_gb=args.validate_limit_gb, limit_s=args.validate_limit_s)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    kept = card.get("rows_kept", 0)
    lines = [
        f"\n## Ingest memory on a {size_gb:.2f} GB CSV — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n",
        f"`python benchmarks/ingest_memory.py --size-mb {args.size_mb} --sample {args.sample}"
        f"{' --csv <that file, written earlier>' if args.csv else ''}`; {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GB RAM, Python {platform.python_version()}. The CSV: {rows:,} rows of "
        f"2–6 MR snippets (3 classes), plus 4 columns ingest does not use; each command a fresh process "
        f"(`tuneflow <stage> --set data.source=… --set validation.fix=false`), peak RSS from os.wait4, PSS of the "
        f"process tree sampled each second.\n",
        "| command | rows | wall (s) | peak RSS (GB) | peak PSS, process tree (GB) | target |",
        "|---|---|---|---|---|---|",
        "| `tuneflow ingest`, whole file | {:,} read, {:,} kept | {} | {} | {} | ≤ 1.5 GB |".format(
            card.get("rows_read", 0), kept, *cell(ingested)),
        "| `tuneflow validate` on that output | {:,} | {} | {} | {} | ≤ 1.5 GB |".format(kept, *cell(gate)),
    ]
    if args.sample:
        lines += ["| `tuneflow ingest`, data.sample={:,} | {:,} kept | {} | {} | {} | |".format(args.sample, args.sample, *cell(ingested_sample)),
                  "| `tuneflow validate` on that output | {:,} | {} | {} | {} | |".format(args.sample, *cell(gate_sample))]
    met = {name: not result["stopped"] and result["rc"] in (0, 3) and result["peak_gb"] <= TARGET_GB
           for name, result in (("ingest", ingested), ("validate", gate))}
    lines += ["", f"Target (ingest and validate of the whole file each ≤ {TARGET_GB:g} GB peak RSS, exit 0 or 3): "
              + ("met" if all(met.values()) else "NOT met: " + ", ".join(name for name, ok in met.items() if not ok))
              + f"; ingest + validate took {ingested['wall_s'] + gate['wall_s']:.0f} s in all.", ""]
    text = "\n".join(lines) + "\n"
    print(text) if args.no_publish else publish(text)


if __name__ == "__main__":
    main()
