"""`tuneflow tune` on MR polarity (issue 14): a 3,000-row stratified sample, LoRA on MiniLM-L6, 12 trials per study
within a fixed time budget, once with median pruning and once without. The best trial of each study and the
configured defaults are then read against the test split, once each (the studies themselves select on validation
and never read it). Prints a table and appends it to benchmarks/RESULTS.md.

    python benchmarks/tune_mr.py [--budget-s 780] [--trials 12] [--epochs 1,2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MR, merged_test_accuracy, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=780, help="tune.timeout_s of each study")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", default="1,2", help="the choices of train.epochs in the space")
    parser.add_argument("--sample", type=int, default=3000)
    parser.add_argument("--note", default="", help="a sentence for the table's header: what was reduced and why")
    parser.add_argument("--dry-run", action="store_true", help="print the table only (a smoke run with small settings)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    work = Path(tempfile.mkdtemp(prefix="tune-mr-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.chdir(work)

    from flows.tune import run_study
    from pipeline.runner import run_stage
    from pipeline.table import STAGES
    from tuneflow import artifacts
    from tuneflow.artifacts import Layout, read_json
    from tuneflow.config import load_params

    epochs = [int(value) for value in args.epochs.split(",")]
    spaces = load_params(REPO / "params.yaml").tune.model_dump(mode="json", exclude_none=True)["space"]
    spaces["lora"]["train.epochs"] = {"choices": epochs}
    base = {"artifacts": str(work / "artifacts"), "data.source": str(MR), "data.sample": args.sample,
            "model.max_length": 64, "train.method": "lora", "tune.n_trials": args.trials, "tune.timeout_s": args.budget_s,
            "tune.space": spaces}
    params = load_params(REPO / "params.yaml", ("benchmark", base))
    layout = Layout(Path(params.artifacts))
    for stage in ("ingest", "validate"):
        run_stage(STAGES[stage], params)
    card = read_json(layout.gated_data / artifacts.DATA_CARD)

    def test_accuracy(model_dir: Path) -> float:  # the one read of the test split per model
        return merged_test_accuracy(model_dir, layout.gated_data, params.model, read_json(model_dir / artifacts.TRAIN_SUMMARY))[0]

    started = time.perf_counter()
    run_stage(STAGES["train"], params)
    defaults_summary = read_json(layout.path(artifacts.MODEL) / artifacts.TRAIN_SUMMARY)
    train_cfg = params.train
    rows = [{"run": f"defaults (params.yaml: lr {train_cfg.learning_rate:g}, r {train_cfg.lora.r}, alpha {train_cfg.lora.alpha}, "
                    f"warm-up {train_cfg.warmup_ratio:g}, {train_cfg.epochs:g} epochs)", "finished": "1",
             "wall": time.perf_counter() - started, "per_trial": "—", "best": "—",
             "validation": (defaults_summary["best_validation_macro_f1"], defaults_summary["best_validation_accuracy"]),
             "test": test_accuracy(layout.path(artifacts.MODEL))}]

    for pruner in ("median", "none"):
        study_params = load_params(REPO / "params.yaml", ("benchmark", {**base, "tune.pruner": pruner,
                                                                        "tune.study_name": f"mr-lora-{pruner}"}))
        started = time.perf_counter()
        study = run_study(study_params)
        wall = time.perf_counter() - started
        trials = study.summary["trials"]
        best = next(trial for trial in trials if trial["number"] == study.summary["best_trial"])
        best_dir = study.root / f"trial-{best['retry_of'] if best['retry_of'] is not None else best['number']:03d}" / artifacts.MODEL
        summary = read_json(best_dir / artifacts.TRAIN_SUMMARY)
        seconds = {state: [trial["seconds"] for trial in trials if trial["state"] == state and trial["seconds"]]
                   for state in ("COMPLETE", "PRUNED")}
        every = seconds["COMPLETE"] + seconds["PRUNED"]
        per_trial = (f"{statistics.mean(every):.0f} (complete {statistics.mean(seconds['COMPLETE']):.0f}"
                     + (f", pruned {statistics.mean(seconds['PRUNED']):.0f}" if seconds["PRUNED"] else "") + ")")
        values = ", ".join(f"{key.removeprefix('train.')}={value:.3g}" if isinstance(value, float) else f"{key.removeprefix('train.')}={value}"
                           for key, value in best["params"].items())
        rows.append({"run": f"study, pruner {pruner}", "finished": f"{len(every)} ({len(seconds['COMPLETE'])} complete, "
                     f"{len(seconds['PRUNED'])} pruned)", "wall": wall, "per_trial": per_trial,
                     "best": f"trial {best['number']}: {values}",
                     "validation": (summary["best_validation_macro_f1"], summary["best_validation_accuracy"]),
                     "test": test_accuracy(best_dir)})

    counts = card["counts"]
    lines = [f"## `tuneflow tune` on MR polarity, LoRA (issue 14) — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"`python benchmarks/tune_mr.py --budget-s {args.budget_s:g} --trials {args.trials} --epochs {args.epochs}`; "
             f"MR ({args.sample:,}-row stratified sample: train {counts['train']}, validation {counts['validation']}, "
             f"test {counts['test']}), LoRA on all-MiniLM-L6-v2, max_length 64; {os.cpu_count()} cores shared with other "
             f"work ({platform.machine()}; the defaults trained at {defaults_summary['train_samples_per_s']:.1f} samples/s), "
             f"one process. Each study: TPE (seed 0), {args.trials} trials or "
             f"{args.budget_s:g} s, whichever comes first; trial 0 is the defaults. Space: params.yaml's `tune.space.lora` "
             f"with train.epochs limited to {epochs} to fit the time budget (params.yaml allows 1–3). The studies select on "
             f"validation macro-F1 only; the test column is read once per row, after the studies, for the verdict."
             + (f" {args.note}" if args.note else ""), "",
             "| run | trials finished | wall (s) | s per trial (mean) | best trial | validation macro-F1 / accuracy | **test accuracy** |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['run']} | {row['finished']} | {row['wall']:.0f} | {row['per_trial']} | {row['best']} | "
                     f"{row['validation'][0]:.4f} / {row['validation'][1]:.4f} | {row['test']:.4f} |")
    print("\n".join(lines)) if args.dry_run else publish("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
