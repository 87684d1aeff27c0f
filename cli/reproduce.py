"""`tuneflow reproduce NAME VERSION`: re-run a registered version's exact configuration and say whether it holds.

The params come from the version's MLflow run (resolved_params.yaml), the data from the `data.source` they name,
which must still hash to the version's `data_hash`. The stages run ingest → evaluate into their own artifacts root
(default reproduce/<name>-v<version>); promote never runs, so the registry is only read. The verdict: test
macro-F1 within ±`--tolerance` of the recorded one, and the registered and the rebuilt ONNX models' predictions on the
test split, text by text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tuneflow import progress

STAGES_RUN = ("ingest", "validate", "train", "export", "champion", "evaluate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")
    parser.add_argument("version")
    parser.add_argument("--artifacts", type=Path, help="where the stages write (default: reproduce/<name>-v<version>)")
    parser.add_argument("--tolerance", type=float, default=0.005, help="test macro-F1 may differ by this much (default 0.005)")


def reproduce(args: argparse.Namespace) -> int:
    from pipeline.runner import run_stage
    from pipeline.table import STAGES
    from tuneflow import artifacts
    from tuneflow.artifacts import Layout, read_json, write_json
    from tuneflow.config import Params
    from tuneflow.data import read_splits
    from tuneflow.errors import InputError, StageFailed
    from tuneflow.onnx_runtime import OnnxClassifier
    from tuneflow.registry import Registry, temporary_dir

    registry = Registry()
    version = registry.get(args.name, args.version)
    root = args.artifacts or Path(artifacts.REPRODUCE) / f"{args.name}-v{args.version}"
    params = Params.model_validate({**registry.resolved_params(version), "artifacts": str(root)})
    layout = Layout(root)
    for name in STAGES_RUN:
        with progress.stage(f"{name} (reproducing {args.name} v{args.version})"):
            run_stage(STAGES[name], params)
        if name == "validate":
            data_hash = read_json(layout.gated_data / artifacts.DATA_CARD)["data_hash"]
            if data_hash != version.tags.get("data_hash"):
                raise InputError(f"data.source {params.data.source}: its data now hashes to {data_hash[:12]}, but "
                                 f"{args.name} v{args.version} was trained on {version.tags.get('data_hash', '?')[:12]}; "
                                 "restore that data (e.g. `git checkout` / `dvc checkout` of its commit) and run again")

    metrics = read_json(layout.path(artifacts.EVAL) / artifacts.METRICS)
    recorded = float(version.tags["test_macro_f1"])
    texts = read_splits(layout.gated_data, ("test",))["test"]["text"].tolist()
    parity = read_json(layout.path(artifacts.EXPORT) / artifacts.PARITY)
    rebuilt = OnnxClassifier(layout.path(artifacts.EXPORT) / parity.get("onnx_file", artifacts.ONNX_MODEL),
                             layout.path(artifacts.EXPORT) / artifacts.ASSETS)
    with temporary_dir() as scratch:
        registered = OnnxClassifier.from_mlflow_model(registry.download(version, Path(scratch)))
        differing = sum(a != b for a, b in zip(registered.predict(texts), rebuilt.predict(texts)))
    report = {"model_name": args.name, "version": args.version, "data_hash": data_hash,
              "recorded_test_macro_f1": recorded, "reproduced_test_macro_f1": metrics["macro_f1"],
              "tolerance": args.tolerance, "metrics_match": abs(metrics["macro_f1"] - recorded) <= args.tolerance,
              "test_texts": len(texts), "differing_predictions": differing,
              "shipped_file": version.tags.get("shipped_file"), "git_commit": version.tags.get("git_commit")}
    write_json(root / artifacts.REPRODUCE_REPORT, report)
    print(f"{args.name} v{args.version} reproduced in {root}: test macro-F1 {metrics['macro_f1']:.4f} vs {recorded:.4f} "
          f"recorded ({'within' if report['metrics_match'] else 'OUTSIDE'} ±{args.tolerance:g}); "
          f"{differing} of {len(texts)} test predictions differ from the registered ONNX model")
    if not report["metrics_match"] or differing:
        raise StageFailed(f"{args.name} v{args.version} did not reproduce (see {root / artifacts.REPRODUCE_REPORT}); "
                          "set train.deterministic=true and the same train.threads for bit-identical reruns")
    return 0
