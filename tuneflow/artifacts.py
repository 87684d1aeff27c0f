"""Every artifact path and file name tuneflow writes, and how an artifact folder is published whole.

The folders under the artifacts root are the stage outputs (DVC outs); the names below are the files
inside them. Stages, drivers, the dvc.yaml generator and the tests name artifacts only through this module.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from tuneflow.errors import InputError

# stage output folders, relative to the artifacts root
DATA = "data"
VALIDATION = "validation"
MODEL = "model"
EXPORT = "export"
EVAL = "eval"
PROMOTION = "promotion"
CHAMPION = "champion"
OUTPUT_FOLDERS = (DATA, VALIDATION, MODEL, EXPORT, CHAMPION, EVAL, PROMOTION)
SOURCE_FINGERPRINT = "source.json"  # what the DVC `source` stage records of data.source (see cli/dvc_yaml.py)
MARKER = ".tuneflow-artifacts"  # in every folder tuneflow owns: the artifacts root and its scratch folder (Layout.work)
CHECKPOINTS = "checkpoints"  # in Layout.work

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
TRAIN_CURVE, VALIDATION_CURVE = "train_curve.csv", "validation_curve.csv"  # by optimizer step, for `dvc plots show`
VALIDATION_LOGITS = "validation_logits.npy"  # the trained model's logits on the validation split (export's parity reference)
ONNX_MODEL = "model.onnx"
ONNX_TRACED_MODEL = "model.torchscript.onnx"  # export.optimize=transformer: the optimizer's input, deleted once fused
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
REPRODUCE, REPRODUCE_REPORT = "reproduce", "reproduce.json"  # `tuneflow reproduce`: reproduce/<name>-v<version>/ roots
TUNE = "tune"  # `tuneflow tune`: <root>/tune/study.db (the Optuna storage) and <root>/tune/<study>/ (trial roots, summary)
STUDY_DB = "study.db"
STUDY_JSON = "study.json"
STUDY_MD = "study.md"
PLAN = "plan"  # `tuneflow plan`: <root>/plan/plan.json and plan.md, the estimates made before training
PLAN_JSON = "plan.json"
PLAN_MD = "plan.md"
VERIFIED_BASE = ".tuneflow-verified.json"  # in a reassembled base model's cache folder: its weights' sha256 was checked
PIPELINES = "pipelines"  # `tuneflow run --pipeline NAME` and deployments: <root>/pipelines/<name>/, a root per pipeline


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
        """Scratch space outside the DVC outs (Trainer checkpoints survive a failed stage here): `.tuneflow/<root name>`
        beside the root, named from the absolute path so that a root such as `.` or `..` cannot make it the root's parent."""
        root = Path(os.path.abspath(self.root))
        return root.parent / ".tuneflow" / root.name

    @contextlib.contextmanager
    def one_run(self, waiting: Callable[[], None]) -> Iterator[None]:
        """Hold this root for a whole flow run: a second run on it (another deployment of the pipeline, a `tuneflow
        run` by hand) calls `waiting` once and blocks until the first ends, so two runs' stages never interleave.
        An exclusive flock on `.tuneflow/<root name>.run.lock`: the kernel drops it when the holder dies."""
        lock = self.work.with_name(self.work.name + ".run.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting()
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield


# --- which folders are tuneflow's, and how a stage folder is replaced -------------------------------------------
#
# A folder tuneflow writes into carries MARKER. Inside a marked artifacts root tuneflow replaces its stage output
# folders and deletes only its own hidden leftovers, `.<output folder>.staging.<id>` (a stage's new content being
# written) and `.<output folder>.old.<id>` (the version it replaces, renamed aside during the swap); nothing else.

# `.model.staging.k3x9a_2q`, `.model.old.k3x9a_2q`, and `.model.k3x9a_2q` (the staging names before the marker)
LEFTOVER = re.compile(rf"^\.(?P<target>{'|'.join(OUTPUT_FOLDERS)})\.(?:(?P<kind>staging|old)\.)?[a-z0-9_]+$")
# an unmarked root from before the marker is adopted when it holds only these (see adoptable)
TUNEFLOW_FILES = frozenset({SOURCE_FINGERPRINT, COMPARE, PLAN, TUNE, PIPELINES, ".gitignore"})  # DVC writes .gitignore beside its outs


def adoptable(entry: Path) -> bool:
    """Whether an entry of an unmarked root is tuneflow's: a stage output folder with the params.json the runner
    writes in every one (DVC restores them with it), a file or folder tuneflow writes at the root, or a leftover."""
    if entry.name in OUTPUT_FOLDERS:
        return (entry / PARAMS).is_file()
    return entry.name in TUNEFLOW_FILES or entry.name == MARKER or (LEFTOVER.match(entry.name) is not None and entry.is_dir())


def claim(folder: Path, owned: Callable[[Path], bool] = adoptable, what: str = "a tuneflow artifacts folder") -> bool:
    """Make sure `folder` is tuneflow's before anything is written into it; returns whether it was created here.

    A missing folder is created with the marker; an empty one, or one whose every entry is `owned`, is marked
    (adopted); any other folder without the marker is refused: tuneflow never writes over what it did not make."""
    marker = folder / MARKER
    if marker.is_file():
        return False
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: not a folder; set `artifacts` to a folder")
    created = not folder.exists()
    if not created:
        foreign = sorted(entry.name for entry in folder.iterdir() if not owned(entry))
        if foreign:
            raise InputError(f"{folder}: not {what} (no {MARKER} file, and it holds {foreign[0]!r}, which tuneflow did "
                             f"not write); set `artifacts` to a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # a concurrent tuneflow process marked it first
        with marker.open("x", encoding="utf-8") as handle:
            json.dump({"written_by": "tuneflow", "what": what, "created": datetime.datetime.now(datetime.timezone.utc)
                       .isoformat(timespec="seconds"), "note": "tuneflow replaces its own folders here; keep this file"}, handle)
    return created


def claim_work(work: Path) -> bool:
    """`claim` for Layout.work: the checkpoints the Trainer writes (a folder from before the marker holds only those)."""
    return claim(work, lambda entry: entry.name in (CHECKPOINTS, MARKER), f"tuneflow's scratch folder for {work.name}")


def unclaim(folder: Path) -> None:
    """Remove a folder this process created if nothing but the marker is in it (a refused stage leaves nothing behind)."""
    if folder.is_dir() and {entry.name for entry in folder.iterdir()} <= {MARKER}:
        (folder / MARKER).unlink(missing_ok=True)
        folder.rmdir()


@contextlib.contextmanager
def holding(root: Path) -> Iterator[list[str]]:
    """Hold the marked `root` for one stage. When no other tuneflow process holds it, first recover what a killed
    run left in it (see `recover`); the list says what was done. The hold is a shared flock on the marker, which
    the kernel drops when the process dies, so a leftover is never mistaken for another process's live folder."""
    with (root / MARKER).open("rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another stage is running in this root: its staging folders are live
            recovered: list[str] = []
        else:
            recovered = recover(root)
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield recovered


def recover(root: Path) -> list[str]:
    """Undo a kill in the marked `root`: an aside folder whose target is missing goes back (the old complete version
    returns); every other tuneflow leftover is deleted. Call only while no other process is in a stage here."""
    done = []
    leftovers = sorted(entry for entry in root.iterdir() if LEFTOVER.match(entry.name) and entry.is_dir())
    for entry in leftovers:
        match = LEFTOVER.match(entry.name)
        target = root / match["target"]
        if match["kind"] == "old" and not os.path.lexists(target):
            entry.rename(target)
            done.append(f"restored {target.name}/ from {entry.name} (a run was killed while replacing it)")
    for entry in leftovers:
        if os.path.lexists(entry):
            _remove(entry)
            done.append(f"removed {entry.name} (left by a killed run)")
    return done


def staging_dir(target: Path) -> Path:
    """An empty sibling folder, `.<name>.staging.<id>`, to write `target`'s new content into."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; artifacts are ordinary files
    return staging


def publish(staging: Path, target: Path) -> None:
    """Replace `target` with the finished `staging` folder: the old version is renamed aside, the new one renamed in,
    then the aside deleted. Each rename is atomic, so a kill leaves `target` whole (old or new), or missing with the
    old version aside, which `recover` puts back."""
    aside = staging.with_name(staging.name.replace(".staging.", ".old.", 1))
    if os.path.lexists(target):
        target.rename(aside)
    try:
        staging.rename(target)
    except OSError:
        if os.path.lexists(aside):
            aside.rename(target)
        raise
    if os.path.lexists(aside):
        _remove(aside)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def content_hash(path: Path) -> str | None:
    """sha256 of a file, or of a folder's relative file names and contents; None when the path is absent.

    In a folder a symbolic link is hashed as where it points (as git records one), never followed: its target is
    inside the folder and hashed there. A link that dangles, loops or leads outside the folder is refused in one
    line, as ingest refuses it in a folder data.source (tasks/ingest.py, `inside`)."""
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        return None
    root, entries = path.resolve(), []
    for folder, folders, files in os.walk(path):  # followlinks=False: a linked folder is listed, never entered
        folders.sort()  # the first bad link named is the first in name order, as ingest names it
        for name in sorted(folders + files):
            entry = Path(folder) / name
            if entry.is_symlink():
                entries.append((entry, f"link {_link_target(entry, path, root)}"))
            elif name in files and entry.is_file():
                entries.append((entry, _file_sha256(entry)))
    digest = hashlib.sha256()
    for entry, content in sorted(entries):
        digest.update(f"{entry.relative_to(path).as_posix()}\0{content}\n".encode())
    return digest.hexdigest()


def _link_target(link: Path, folder: Path, root: Path) -> str:
    """Where `link` points, relative to the folder (`root` is the folder resolved); else the one-line error."""
    where = link.relative_to(folder).as_posix()
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop (RuntimeError before Python 3.13)
        raise InputError(f"{folder}: {where} is a broken or looping symbolic link") from None
    if not target.is_relative_to(root):
        raise InputError(f"{folder}: {where} links to {target}, outside the folder; links out of a data folder are not "
                         f"followed (copy the files in)")
    return target.relative_to(root).as_posix()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
