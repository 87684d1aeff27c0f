"""MR polarity test accuracy by base model: `tuneflow run --pipeline mr-polarity` once per base, same default split.

Each base runs in its own scratch project (copies of params.yaml and pipelines.yaml, its own MLflow SQLite store and
PREFECT_HOME), so the repository's registry is untouched. Everything is the mr-polarity pipeline (LoRA, max_length 64,
the default 70/10/20 split of the full MR file) plus `--set model.base=<base>` and any shared `--set` given here.
Hyperparameters are chosen before the run (never on the test split); the test split is read only by the evaluation
gate, whose ONNX-model metrics and paired-bootstrap 95 % intervals are what the table reports.

    .venv/bin/python benchmarks/mr_base_models.py builtin:all-mpnet-base-v2 [builtin:all-MiniLM-L6-v2 ...] \
        [--set train.epochs=1 --set train.learning_rate=5e-4 ...] [--nice 5] [--log-dir DIR]

Prints a table and appends it to benchmarks/RESULTS.md (benchmarks.common.publish).
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MR, publish  # noqa: E402

TUNEFLOW = Path(sys.executable).parent / "tuneflow"
PIPELINE = "mr-polarity"


def run_base(base: str, overrides: list[str], niceness: int, log_dir: Path | None) -> dict:
    """One `tuneflow run --pipeline mr-polarity` with `base`; its artifacts' figures and the wall time."""
    scratch = Path(tempfile.mkdtemp(prefix="tuneflow-mr-base-"))
    for name in ("params.yaml", "pipelines.yaml"):
        shutil.copy(REPO / name, scratch / name)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}", "PREFECT_HOME": str(scratch / ".prefect"),
           # Prefect's ephemeral server gives up after 20 s by default; on a loaded 2-core machine it takes longer to start
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")}
    sets = [f"data.source={MR}", f"model.base={base}", *overrides]
    command = [str(TUNEFLOW), "run", "--pipeline", PIPELINE, *(arg for pair in sets for arg in ("--set", pair))]
    if niceness:
        command = ["nice", "-n", str(niceness), *command]
    loads, stop = [os.getloadavg()[0]], threading.Event()

    def sample_load() -> None:  # the 1-minute load average every 30 s while the run lasts (other work shares the CPU)
        while not stop.wait(30):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    loads.append(os.getloadavg()[0])
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{base.replace(':', '_').replace('/', '_')}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        sys.exit(f"tuneflow run failed for {base} ({done.returncode}); scratch kept at {scratch}:\n{done.stderr[-3000:]}")
    params = resolved(scratch, sets)
    root = Path(params.artifacts) if Path(params.artifacts).is_absolute() else scratch / params.artifacts
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    summary = json.loads((root / "model" / "train_summary.json").read_text())
    verdict = json.loads((root / "eval" / "verdict.json").read_text())
    train = {"epochs": params.train.epochs, "learning_rate": params.train.learning_rate, "sample": params.data.sample}
    shutil.rmtree(scratch, ignore_errors=True)
    return {"base": base, "metrics": metrics, "summary": summary, "verdict": verdict, "wall_s": wall, "train": train,
            "load": loads}


def resolved(scratch: Path, sets: list[str]):
    """The parameters the run used: params.yaml, the pipeline's overlay (and its own artifacts root, see
    tuneflow.config.pipeline_params), then the --set pairs, resolved as the CLI resolves them."""
    from tuneflow.config import parse_set, pipeline_params

    _, params = pipeline_params(PIPELINE, scratch / "params.yaml", scratch / "pipelines.yaml", ("--set", parse_set(sets)))
    return params


def interval(metrics: dict, name: str) -> str:
    ci = metrics["intervals"][name]
    return f"{ci['value']:.4f} ({ci['low']:.4f}–{ci['high']:.4f})"


def validation_by_epoch(summary: dict) -> str:
    """Validation accuracy / macro-F1 after each epoch of the run's last attempt (a collapse restart is a new attempt)."""
    attempts = summary.get("attempts")
    epochs = attempts[-1]["validation"] if attempts else []
    return "; ".join(f"ep {row['epoch']:g}: {row['accuracy']:.4f} / {row['macro_f1']:.4f}" for row in epochs) or "—"


def render(results: list[dict], overrides: list[str]) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bf16 = {result["summary"].get("bf16") for result in results}
    sample = results[0]["train"]["sample"]  # the --set pairs are shared by every base
    lines = [f"\n## MR polarity by base model (issue 13) — {stamp}\n",
             f"`python benchmarks/mr_base_models.py {' '.join(r['base'] for r in results)}"
             f"{''.join(' --set ' + pair for pair in overrides)}`: `tuneflow run --pipeline mr-polarity` per base, MR "
             f"({'every row' if sample is None else f'data.sample {sample} rows'}), default 70/10/20 split, max_length 64, "
             f"train.* from params.yaml unless set above; {os.cpu_count()} cores, {platform.machine()}, "
             f"bf16 {'on' if True in bf16 else 'off (fp32 training)'}; test metrics from the "
             "evaluation gate on the exported ONNX model, "
             f"{results[0]['metrics']['intervals']['accuracy'].get('resamples', '?')}-resample paired-bootstrap 95 % intervals. "
             "Hyperparameters fixed before the run; nothing selected on test.\n",
             "| base | method | epochs | lr | validation acc / macro-F1 (per epoch) | **test accuracy (95 % CI)** | "
             "test macro-F1 (95 % CI) | baseline macro-F1 (TF-IDF + LR) | gate | train (s) | samples/s | total wall (s) | "
             "1-min load avg, mean (min–max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        metrics, summary, train = result["metrics"], result["summary"], result["train"]
        lr = summary.get("learning_rate", train.get("learning_rate"))
        restart = summary.get("collapse_restart") or {}
        lr_text = f"{float(lr):g}" + (" (collapse restart)" if isinstance(restart, dict) and restart.get("fired") else "")
        loads = result["load"]
        lines.append(
            f"| {result['base']} | {summary['method']} | {summary['epochs_run']:g} | {lr_text} | {validation_by_epoch(summary)} | "
            f"**{interval(metrics, 'accuracy')}** | {interval(metrics, 'macro_f1')} | {metrics['baseline']['macro_f1']:.4f} | "
            f"{'passed' if result['verdict']['passed'] else 'failed'} | {summary['train_time_s']:.0f} | "
            f"{summary['train_samples_per_s']:.2f} | {result['wall_s']:.0f} | {sum(loads) / len(loads):.1f} ({min(loads):.1f}–{max(loads):.1f}) |")
    lines += ["", f"Test rows: {', '.join(str(r['metrics']['test_rows']) for r in results)}; gate verdicts: "
              + "; ".join(f"{r['base']}: {r['verdict'].get('summary', '')}" for r in results), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bases", nargs="+", help="model.base values, e.g. builtin:all-mpnet-base-v2")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every base's run")
    parser.add_argument("--nice", type=int, default=0, help="run tuneflow under `nice -n N`")
    parser.add_argument("--log-dir", type=Path, help="write each run's output (stdout, then stderr) here")
    parser.add_argument("--no-publish", action="store_true", help="print the table only (smoke runs)")
    args = parser.parse_args()
    results = []
    for base in args.bases:
        result = run_base(base, args.overrides, args.nice, args.log_dir)
        print(f"{base}: test accuracy {interval(result['metrics'], 'accuracy')}, {result['wall_s']:.0f} s wall", flush=True)
        results.append(result)
    table = render(results, args.overrides)
    print(table) if args.no_publish else publish(table)


if __name__ == "__main__":
    main()
