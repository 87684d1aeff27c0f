"""Tuneflow writes only into folders it owns (the marker), swaps a stage folder by renames, and recovers a kill."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, gated_params, topic_frame
from pipeline.runner import run_stage
from pipeline.table import STAGES
from tuneflow import artifacts as a
from tuneflow.artifacts import Layout, claim, claim_work, content_hash, holding, recover, staging_dir
from tuneflow.config import Params
from tuneflow.errors import InputError


def ingest_params(folder: Path, root: Path) -> Params:
    source = folder / "topics.csv"
    topic_frame(10).to_csv(source, index=False)
    return Params.model_validate({"artifacts": str(root), "data": {"source": str(source)}})


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its content hash (what "left untouched" compares)."""
    return {path.relative_to(folder).as_posix(): content_hash(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def write_version(folder: Path, tag: str, files: int = 3) -> str:
    """A complete stage folder: some files, a subfolder, and params.json."""
    (folder / "plots").mkdir(parents=True)
    for index in range(files):
        (folder / f"part{index}.bin").write_bytes(f"{tag}-{index}".encode() * 1000)
    (folder / "plots" / "curve.png").write_bytes(tag.encode())
    a.write_json(folder / a.PARAMS, {"stage": "train", "tag": tag})
    return content_hash(folder)


def test_a_new_root_is_marked_and_every_stage_output_folder_is_a_known_one(tmp_path):
    assert {stage.output for stage in STAGES.values()} == set(a.OUTPUT_FOLDERS)
    root = tmp_path / "fresh" / "artifacts"
    run_stage(STAGES["ingest"], ingest_params(tmp_path, root))
    marker = json.loads((root / a.MARKER).read_text())
    assert marker["written_by"] == "tuneflow" and (root / a.DATA / a.PARAMS).exists()
    assert sorted(entry.name for entry in root.iterdir()) == [a.MARKER, a.DATA]  # not inside a stage folder (a DVC out)


@pytest.mark.parametrize("foreign", ["thesis.tex", "data/thesis.tex", ".config/settings"])
def test_a_folder_tuneflow_did_not_make_is_refused_and_left_untouched(tmp_path, foreign):
    root = tmp_path / "home"
    (root / foreign).parent.mkdir(parents=True, exist_ok=True)
    (root / foreign).write_text("mine")
    before = tree(root)
    with pytest.raises(InputError) as refused:
        run_stage(STAGES["ingest"], ingest_params(tmp_path, root))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{root}: not a tuneflow artifacts folder") and "`artifacts`" in message
    assert foreign.split("/")[0] in message
    assert tree(root) == before and not (root / a.MARKER).exists() and sorted(os.listdir(root)) == sorted({foreign.split("/")[0]})


def test_the_parent_of_a_root_or_the_checkout_itself_is_refused(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    monkeypatch.chdir(project)
    for root in (".", "..", str(project / "src")):
        with pytest.raises(InputError, match="not a tuneflow artifacts folder"):
            run_stage(STAGES["ingest"], ingest_params(tmp_path, Path(root)))
    assert (project / "src" / "main.py").read_text() == "print('mine')\n" and not list(tmp_path.rglob(a.MARKER))


def test_an_empty_folder_or_a_root_from_before_the_marker_is_adopted(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim(empty) is False and (empty / a.MARKER).is_file()

    # a root written before the marker existed (or restored by `dvc checkout`): stage folders with their params.json,
    # DVC's .gitignore, the DVC source fingerprint, a staging folder a killed run left under the old naming
    params = ingest_params(tmp_path, tmp_path / "artifacts")
    run_stage(STAGES["ingest"], params)
    root = Path(params.artifacts)
    (root / a.MARKER).unlink()
    (root / ".gitignore").write_text("/data\n")
    a.write_json(root / a.SOURCE_FINGERPRINT, {"source": "topics.csv", "sha256": "0"})
    (root / ".data.k2x9_q1z").mkdir()
    (root / ".data.k2x9_q1z" / "train.parquet").write_bytes(b"half")
    data_before = content_hash(root / a.DATA)
    run_stage(STAGES["validate"], params)
    assert (root / a.MARKER).is_file() and not (root / ".data.k2x9_q1z").exists()
    assert content_hash(root / a.DATA) == data_before and (root / ".gitignore").read_text() == "/data\n"

    # the same root where a stage folder has no params.json: not provably tuneflow's, so refused
    (root / a.MARKER).unlink()
    (root / a.VALIDATION / a.PARAMS).unlink()
    with pytest.raises(InputError, match=f"holds '{a.VALIDATION}', which tuneflow did not write"):
        run_stage(STAGES["validate"], params)


def test_a_refused_stage_on_a_new_root_leaves_neither_the_root_nor_the_scratch_folder(tmp_path):
    params = ingest_params(tmp_path, tmp_path / "new")
    params = params.model_copy(update={"data": params.data.model_copy(update={"source": str(tmp_path / "absent.csv")})})
    with pytest.raises(InputError):
        run_stage(STAGES["ingest"], params)
    assert not (tmp_path / "new").exists() and not (tmp_path / ".tuneflow").exists()


def test_the_scratch_folder_is_beside_the_root_and_only_ever_tuneflows(tmp_path, monkeypatch):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    # `..` as the root: its scratch folder is `.tuneflow/a` beside it, never `.tuneflow/..` (the working directory)
    assert Layout(Path("..")).work == tmp_path / ".tuneflow" / "a"
    assert Layout(Path(".")).work == tmp_path / "a" / ".tuneflow" / "b"

    work = tmp_path / ".tuneflow" / "artifacts"
    (work / a.CHECKPOINTS / "0123abcd").mkdir(parents=True)  # a scratch folder from before the marker: adopted
    assert claim_work(work) is False and (work / a.MARKER).is_file()
    (work / a.MARKER).unlink()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not tuneflow's scratch folder.*'notes.txt'"):
        claim_work(work)
    assert (work / "notes.txt").read_text() == "mine" and not (work / a.MARKER).exists()


def test_train_refuses_a_scratch_folder_it_did_not_make_before_touching_its_checkpoints(tiny_model, workdir):
    params = gated_params(workdir, topic_frame(10), model={"base": str(tiny_model), "max_length": 32})
    work = Layout(Path(params.artifacts)).work
    (work / a.CHECKPOINTS / "someone-elses").mkdir(parents=True)
    (work / a.CHECKPOINTS / "someone-elses" / "weights.bin").write_bytes(b"precious")
    (work / "README").write_text("my experiments")
    with pytest.raises(InputError, match="scratch folder"):
        run_stage(STAGES["train"], params)
    assert (work / a.CHECKPOINTS / "someone-elses" / "weights.bin").read_bytes() == b"precious"
    assert not (Path(params.artifacts) / a.MODEL).exists()


def test_the_next_stage_restores_an_aside_version_and_removes_only_tuneflow_leftovers(tmp_path, capsys):
    params = ingest_params(tmp_path, tmp_path / "artifacts")
    root = Path(params.artifacts)
    run_stage(STAGES["ingest"], params)
    run_stage(STAGES["validate"], params)
    validation = content_hash(root / a.VALIDATION)
    # what kills leave: validation/ renamed aside mid-swap, a half-written staging folder, a half-deleted aside
    (root / a.VALIDATION).rename(root / ".validation.old.k1")
    (root / ".model.staging.k2").mkdir()
    (root / ".model.staging.k2" / "model.safetensors").write_bytes(b"half")
    (root / ".data.old.k3").mkdir()
    mine = {".notes.old.k4": "dir", ".data.old.k5": "file", "my-results": "dir", ".model": "dir"}
    for name, kind in mine.items():
        (root / name).mkdir() if kind == "dir" else (root / name).write_text("mine")
    run_stage(STAGES["ingest"], params)
    assert content_hash(root / a.VALIDATION) == validation  # the old complete version came back
    assert sorted(entry.name for entry in root.iterdir()) == sorted([a.MARKER, a.DATA, a.VALIDATION, *mine])
    err = capsys.readouterr().err
    assert "restored validation/ from .validation.old.k1" in err and "removed .model.staging.k2" in err


def test_a_leftover_is_only_recovered_when_no_other_process_is_in_a_stage(tmp_path):
    root = tmp_path / "artifacts"
    claim(root)
    (root / ".model.staging.live").mkdir()
    with (root / a.MARKER).open("rb") as other:  # another tuneflow process holding the root in a stage
        fcntl.flock(other, fcntl.LOCK_SH)
        with holding(root) as recovered:
            assert recovered == [] and (root / ".model.staging.live").exists()
    with holding(root) as recovered:
        assert recovered == ["removed .model.staging.live (left by a killed run)"]


KILLING_CHILD = """
import os, signal, sys
from pathlib import Path
from tuneflow import artifacts

nth, calls = int(sys.argv[3]), 0

def killing(real):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call

for name in ("rename", "replace", "unlink", "rmdir"):  # every step of the swap and of deleting the old version
    setattr(os, name, killing(getattr(os, name)))
artifacts.publish(Path(sys.argv[2]), Path(sys.argv[1]))
print("published", calls)
"""


def test_a_kill_at_any_step_of_the_swap_leaves_the_old_or_the_new_version(tmp_path):
    outcomes = []
    for nth in range(1, 40):
        root = tmp_path / f"kill-{nth}"
        claim(root)
        old = write_version(root / a.MODEL, "old")
        staging = staging_dir(root / a.MODEL)
        new = write_version(staging, "new")
        child = subprocess.run([sys.executable, "-c", KILLING_CHILD, str(root / a.MODEL), str(staging), str(nth)],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        if child.returncode == 0:
            assert content_hash(root / a.MODEL) == new and sorted(os.listdir(root)) == [a.MARKER, a.MODEL]
            break
        assert child.returncode == -9, child.stderr
        model = content_hash(root / a.MODEL)
        asides = [entry for entry in root.iterdir() if entry.name.startswith(".model.old.")]
        # never a half-written or half-deleted folder under the name: the old version, the new one, or the old aside
        assert model in (old, new) or (model is None and [content_hash(aside) for aside in asides] == [old]), nth
        outcomes.append("old" if model == old else "new" if model == new else "aside")
        recover(root)
        assert content_hash(root / a.MODEL) == (new if outcomes[-1] == "new" else old), nth
        assert sorted(os.listdir(root)) == [a.MARKER, a.MODEL], nth
    else:
        pytest.fail("publish never finished")
    # every kind of kill point was hit: before the swap, between its renames, while the old version is deleted
    assert outcomes[0] == "old" and "aside" in outcomes and outcomes.count("new") >= 3, outcomes


HOLD_THE_RUN = """
import sys, time
from pathlib import Path
from tuneflow.artifacts import Layout
with Layout(Path(sys.argv[1])).one_run(lambda: None):
    print("holding", flush=True)
    time.sleep(2)
"""


def test_a_second_run_on_a_root_waits_for_the_first_to_end(tmp_path):
    import subprocess
    import sys
    import time

    from tuneflow.artifacts import Layout

    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_RUN, str(tmp_path / "artifacts")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    started, waited = time.monotonic(), []
    with Layout(tmp_path / "artifacts").one_run(lambda: waited.append(holder.poll())):
        assert time.monotonic() - started > 1.5  # entered only once the holder let go (it holds for 2 s)
    assert waited == [None]  # told to wait while the holder was still running
    holder.wait()
    with Layout(tmp_path / "other").one_run(lambda: waited.append("other")):  # another root: no wait
        pass
    assert waited == [None]
