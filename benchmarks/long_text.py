"""`model.long_text` on the default job (BBC, LoRA on MiniLM-L6, max_length 128): truncate vs head_tail vs chunk,
or any settings of that job (`--variant`), each against the gate's TF-IDF baseline on the same test rows.

The repository's params.yaml, in a scratch directory: ingest and the data gate once, then per row the train and
export stages (the stage runner, as `tuneflow train` / `tuneflow export` run them) and the shipped ONNX model on the
test split, pooled as served. Validation macro-F1 is the saved model's as served (train_summary.json); test macro-F1
comes with its paired bootstrap difference from the first row and from the baseline (`tuneflow.baseline`, fit on
the gated train split as the evaluation gate fits it). Prints a table and appends it to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/long_text.py [--policies truncate,head_tail,chunk] [--set KEY=VALUE ...]
    .venv/bin/python benchmarks/long_text.py --variant shipped= --variant 3-epochs=train.epochs=3 \
        --variant full=train.method=full,train.learning_rate=1e-4      # one row per NAME=KEY=VALUE[,KEY=VALUE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import publish  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policies", default="truncate,head_tail,chunk")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variant", dest="variants", action="append", default=[],
                        help="NAME=KEY=VALUE[,KEY=VALUE]: a row with these settings (replaces --policies)")
    args = parser.parse_args()
    from tuneflow.config import parse_set

    if args.variants:
        variants = {name: parse_set([pair for pair in setting.split(",") if pair])
                    for name, _, setting in (variant.partition("=") for variant in args.variants)}
    else:
        variants = {policy: {"model.long_text": policy} for policy in args.policies.split(",")}

    from pipeline.runner import run_stage
    from pipeline.table import STAGES
    from tuneflow import artifacts as a
    from tasks.evaluate import Scored
    from tuneflow.baseline import baseline_probabilities
    from tuneflow.config import load_params, with_overrides
    from tuneflow.data import read_splits
    from tuneflow.scoring import Bootstrap, macro_f1_along

    scratch = Path(tempfile.mkdtemp(prefix="tuneflow-long-text-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"  # train/export do not register; to be safe
    base = load_params(REPO / "params.yaml", ("--set", parse_set(args.overrides)))
    load_before, started_all = os.getloadavg(), time.perf_counter()
    shared = with_overrides(base, "benchmark", {"artifacts": str(scratch / "shared")})
    for name in ("ingest", "validate"):
        run_stage(STAGES[name], shared)
    gate_s = time.perf_counter() - started_all
    gated = Path(shared.artifacts) / a.VALIDATION / a.GATED_DATA
    splits = read_splits(gated)
    train, test = splits["train"], splits["test"]
    card = json.loads((gated / a.DATA_CARD).read_text())
    labels = sorted(train["label"].unique())
    truth = test["label"].map({label: index for index, label in enumerate(labels)}).to_numpy()
    baseline_began = time.perf_counter()
    baseline = baseline_probabilities(train["text"].tolist(), train["label"].tolist(), test["text"].tolist(), labels).argmax(axis=-1)
    baseline_s = time.perf_counter() - baseline_began

    rows, predictions, interrupted = [], {}, False
    try:
        measure(variants, base, scratch, shared, test, rows, predictions)
    except KeyboardInterrupt:  # Ctrl-C (SIGINT): publish the rows measured so far, saying so
        interrupted = True
    load_after = os.getloadavg()
    bootstrap = Bootstrap(1000, 0.95, 0)
    classes = np.unique(truth)

    def difference(ours: np.ndarray, theirs: np.ndarray) -> str:  # the gate's own paired interval
        interval = Scored(truth, ours, classes).macro_f1_difference(theirs, bootstrap)
        return f"{interval['value']:+.4f} ({interval['low']:+.4f} to {interval['high']:+.4f})"

    first_name = next(iter(variants))
    lines = [f"| {'model.long_text' if not args.variants else 'variant'} | validation macro-F1 (as served) | test macro-F1 | "
             f"Δ test vs {first_name} (95 % CI) | Δ test vs baseline (95 % CI) | windows per test text | "
             "train s (epochs) | export s | test inference ms/text | batch-1 P50 / P95 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| TF-IDF baseline (`tuneflow.baseline`) | — | {float(macro_f1_along(truth, baseline, classes)):.4f} | — | — | — | "
                 f"{baseline_s:.0f} (fit + score) | — | — | — |")
    for row in rows:
        assert (row["truth"] == truth).all(), "the ONNX model's label order differs from the baseline's"
        summary = row["summary"]
        versus_first = difference(predictions[row["policy"]], predictions[first_name]) if row["policy"] != first_name else "—"
        lines.append(f"| {row['policy']} | {summary['served_validation_macro_f1']:.4f} | {row['macro_f1']:.4f} | {versus_first} | "
                     f"{difference(predictions[row['policy']], baseline)} | "
                     f"{row['windows_per_text']:.2f} | {row['train_s']:.0f} ({summary['epochs_run']:g}) | {row['export_s']:.0f} | "
                     f"{row['test_ms_per_text']:.1f} | {row['p50']:.1f} / {row['p95']:.1f} |")
    first = rows[0]["summary"]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = ("The default job's settings against the TF-IDF baseline (issue 13, item 5)" if args.variants else
             "Long texts on BBC: `model.long_text` truncate vs head_tail vs chunk (issue 13)")
    command = (''.join(f" --variant {variant}" for variant in args.variants) if args.variants else
               (' --policies ' + args.policies if args.policies != 'truncate,head_tail,chunk' else ''))
    header = (f"## {title} — {stamp}\n\n"
              f"`python benchmarks/long_text.py{command}"
              f"{''.join(' --set ' + pair for pair in args.overrides)}`; params.yaml's default job ({first['method']} on "
              f"{first['base_model']}, max_length {first['max_length']}, {base.train.epochs:g} epochs, bf16 {first['bf16']}), "
              f"head_fraction {base.model.head_fraction}, chunk_overlap {base.model.chunk_overlap}, max_chunks {base.model.max_chunks}. "
              f"Data: train {card['counts']['train']}, validation {card['counts']['validation']}, test {card['counts']['test']}. "
              f"Ingest and the data gate once ({gate_s:.0f} s); per row the train and export stages, then the shipped ONNX model on the test split (every window, logits "
              f"averaged per text under chunk). Machine: {os.cpu_count()} cores, {platform.machine()} (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after), so compare rows of this "
              f"table, not absolute times. {(time.perf_counter() - started_all) / 60:.0f} minutes in all"
              f"{f'; interrupted after {len(rows)} of {len(variants)} rows' if interrupted else ''}.\n\n")
    publish("\n" + header + "\n".join(lines) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)


def measure(variants, base, scratch, shared, test, rows, predictions) -> None:
    from pipeline.runner import run_stage
    from pipeline.table import STAGES
    from tuneflow import artifacts as a
    from tuneflow.config import with_overrides
    from tuneflow.onnx_runtime import OnnxClassifier
    from tuneflow.scoring import macro_f1_along

    for policy, overrides in variants.items():
        params = with_overrides(base, f"--variant {policy}", {**overrides, "artifacts": str(scratch / policy)})
        shutil.copytree(shared.artifacts, params.artifacts)
        began = time.perf_counter()
        run_stage(STAGES["train"], params)
        trained = time.perf_counter()
        run_stage(STAGES["export"], params)
        exported = time.perf_counter()
        root = Path(params.artifacts)
        summary = json.loads((root / a.MODEL / a.TRAIN_SUMMARY).read_text())
        classifier = OnnxClassifier.from_export(root / a.EXPORT)
        texts = test["text"].tolist()
        truth = test["label"].map({label: index for index, label in enumerate(classifier.labels)}).to_numpy()
        scoring = time.perf_counter()
        predicted = classifier.logits(texts).argmax(axis=-1)
        scored = time.perf_counter()
        windows = len(classifier.windows(texts)[1])
        latency = classifier.latency_ms(texts[:50], samples=50, warmup=5)
        predictions[policy] = predicted
        rows.append({"policy": policy, "truth": truth, "summary": summary, "train_s": trained - began,
                     "export_s": exported - trained, "test_ms_per_text": (scored - scoring) * 1000 / len(texts),
                     "windows_per_text": windows / len(texts), "p50": float(np.percentile(latency, 50)),
                     "p95": float(np.percentile(latency, 95)), "macro_f1": float(macro_f1_along(truth, predicted, np.unique(truth)))})
        progress = {key: value for key, value in rows[-1].items() if key not in ("truth", "summary")}
        print(json.dumps(progress | {"validation_macro_f1": summary["served_validation_macro_f1"]}), flush=True)


if __name__ == "__main__":
    main()
