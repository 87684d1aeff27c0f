"""Every artifact path and file name tuneflow writes, and how an artifact folder is published whole.

The folders under the artifacts root are the stage outputs (DVC outs); the names below are the files
inside them. Stages, drivers, the dvc.yaml generator and the tests name artifacts only through this module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# stage output folders, relative to the artifacts root
DATA = "data"
VALIDATION = "validation"
MODEL = "model"
EXPORT = "export"
EVAL = "eval"
PROMOTION = "promotion"
CHAMPION = "champion"
SOURCE_FINGERPRINT = "source.json"  # what the DVC `source` stage records of data.source (see cli/dvc_yaml.py)

# files inside them
REPORT = "report.md"  # every stage writes one: the human summary (and the Prefect artifact)
PARAMS = "params.json"  # the resolved params sections the stage ran with
DATA_CARD = "data_card.json"
GATED_DATA = "data"  # validation/data: the splits that passed the data gate
GATE_REPORT = "report.json"
METRICS = "metrics.json"
FIX_DIFF = "fix_diff.json"
TRAIN_SUMMARY = "train_summary.json"
LOSS_CURVES = "loss_curves.png"
VALIDATION_LOGITS = "validation_logits.npy"  # the trained model's logits on the validation split (export's parity reference)
ONNX_MODEL = "model.onnx"
ONNX_INT8_MODEL = "model.int8.onnx"  # export.quantize=dynamic; shipped instead of model.onnx only when it passed its checks
ASSETS = "assets"
SERVING = "serving.json"
PARITY = "parity.json"
VERDICT = "verdict.json"
CONFUSION_MATRIX = "plots/confusion_matrix.png"
RELIABILITY_DIAGRAM = "plots/reliability.png"
LATENCY_HISTOGRAM = "plots/latency.png"
PERTURBED = "robustness.parquet"  # every perturbed test text and the ONNX model's prediction
CHAMPION_RECORD = "champion.json"
DECISION = "decision.json"
RESOLVED_PARAMS = "resolved_params.yaml"  # in the MLflow run
COMPARE = "compare"  # `tuneflow compare`: <root>/compare/<method>/ artifact roots and the comparison
COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"


def split_file(split: str) -> str:
    return f"{split}.parquet"


@dataclass(frozen=True)
class Layout:
    root: Path

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def gated_data(self) -> Path:
        """The splits that passed the data gate (cleaned by `validate --fix`): what train/export/evaluate/promote read."""
        return self.root / VALIDATION / GATED_DATA

    @property
    def work(self) -> Path:
        """Scratch space outside the DVC outs (Trainer checkpoints survive a failed stage here)."""
        return self.root.parent / ".tuneflow" / self.root.name


def staging_dir(target: Path) -> Path:
    """An empty sibling folder to write `target`'s new content into."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; artifacts are ordinary files
    return staging


def publish(staging: Path, target: Path) -> None:
    """Replace `target` with the finished `staging` folder."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def content_hash(path: Path) -> str | None:
    """sha256 of a file, or of a folder's relative file names and contents; None when the path is absent."""
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
