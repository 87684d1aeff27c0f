"""The stage table: each stage declared once (the six of the pipeline, and `champion`, the registry lookup evaluate compares with).

A stage names its entry function in `tasks/`, the params sections it reads, the artifacts it reads and the
one folder it writes (paths from tuneflow/artifacts.py), and what DVC reports of it (metrics, plots). The
entry receives them as keyword arguments: each declared name is one of its parameters. The code a stage
depends on is derived from its imports (pipeline/cache.py), so it cannot drift from the code.

The CLI (`tuneflow <stage>`), the Prefect flow (flows/retrain.py) and dvc.yaml (`tuneflow dvc-yaml`) are
all derived from this table; TFX component specs and Kedro nodes are the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneflow import artifacts as a

WHOLE = "*"  # a params declaration meaning the whole resolved Params


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function" in tasks/
    help: str
    params: dict[str, str]  # entry keyword -> params section (WHOLE: all of them)
    inputs: dict[str, str]  # entry keyword -> artifact path under the artifacts root
    output: str  # the folder under the artifacts root that the stage writes (given as `out_dir`)
    context: tuple[str, ...] = ()  # run facts the entry takes: work_dir, run_name, experiment, dvc_lock
    reads_source: bool = False  # reads the data named by data.source (fingerprinted for both caches)
    metrics: tuple[str, ...] = ()  # JSON files DVC shows with `dvc metrics`
    plots: tuple[str, ...] = ()  # images
    curves: dict[str, tuple[str, ...]] = field(default_factory=dict)  # CSV file -> the columns DVC plots against "step"
    cache: bool = True  # False: always runs under Prefect (champion and promote read the live registry)
    always_changed: bool = False  # DVC re-runs it on every repro and does not cache its output (live state)
    flags: dict[str, tuple[str, str]] = field(default_factory=dict)  # CLI flag -> (params key set to true, help)

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]


GATED_DATA = f"{a.VALIDATION}/{a.GATED_DATA}"

STAGES: dict[str, Stage] = {stage.name: stage for stage in [
    Stage("ingest", "tasks.ingest:ingest", "read, clean, dedup and split data.source",
          params={"cfg": "data"}, inputs={}, output=a.DATA, reads_source=True),
    Stage("validate", "tasks.validate:validate", "the data gate: schema, labels, balance, leakage (exit 3 on failure)",
          params={"cfg": "validation"}, inputs={"data_dir": a.DATA}, output=a.VALIDATION,
          metrics=(f"{a.VALIDATION}/{a.METRICS}",),
          flags={"--fix": ("validation.fix", "drop leaked and conflicting validation/test rows (see fix_diff.json), then re-validate")}),
    Stage("train", "tasks.train:train", "fine-tune the base model with train.method",
          params={"model_cfg": "model", "cfg": "train"},
          inputs={"gated_data": GATED_DATA, "gate_report": f"{a.VALIDATION}/{a.GATE_REPORT}",
                  "ingest_card": f"{a.DATA}/{a.DATA_CARD}"},
          output=a.MODEL, context=("work_dir",), plots=(f"{a.MODEL}/{a.LOSS_CURVES}",),
          curves={f"{a.MODEL}/{a.TRAIN_CURVE}": ("loss",), f"{a.MODEL}/{a.VALIDATION_CURVE}": ("loss", "macro_f1", "accuracy")}),
    Stage("export", "tasks.export:export", "merge or wrap the trained model, export ONNX, check parity",
          params={"model_cfg": "model", "cfg": "export"}, inputs={"model_dir": a.MODEL, "data_dir": GATED_DATA},
          output=a.EXPORT),
    Stage("champion", "tasks.champion:champion", "look up the registry's @champion for the evaluation gate",
          params={"cfg": "promote"}, inputs={}, output=a.CHAMPION, cache=False, always_changed=True),
    Stage("evaluate", "tasks.evaluate:evaluate", "the evaluation gate on the ONNX model, against the champion and a baseline",
          params={"model_cfg": "model", "cfg": "evaluate"},
          inputs={"export_dir": a.EXPORT, "model_dir": a.MODEL, "data_dir": GATED_DATA, "champion_dir": a.CHAMPION},
          output=a.EVAL, metrics=(f"{a.EVAL}/{a.METRICS}",),
          plots=tuple(f"{a.EVAL}/{plot}" for plot in (a.CONFUSION_MATRIX, a.RELIABILITY_DIAGRAM, a.LATENCY_HISTOGRAM))),
    Stage("promote", "tasks.promote:promote", "register the ONNX model; move @champion if it earned it",
          params={"params": WHOLE},
          inputs={"validation_dir": a.VALIDATION, "model_dir": a.MODEL, "export_dir": a.EXPORT, "eval_dir": a.EVAL},
          output=a.PROMOTION, context=("run_name", "experiment", "dvc_lock"), cache=False),
]}
