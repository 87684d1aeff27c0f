"""Where each stage writes (the DVC outs), and how it writes without leaving half an artifact."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def validation(self) -> Path:
        return self.root / "validation"

    @property
    def gated_data(self) -> Path:
        """The splits that passed the data gate (cleaned by `validate --fix`): what train/export/evaluate/promote read."""
        return self.validation / "data"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def promotion(self) -> Path:
        return self.root / "promotion"

    @property
    def work(self) -> Path:
        """Scratch space outside the DVC outs (Trainer checkpoints survive a failed stage here)."""
        return self.root.parent / ".tuneflow" / self.root.name


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; replace `target` with it only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; artifacts are ordinary files
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
