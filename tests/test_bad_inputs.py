"""Every user error is one line with its documented exit code, and leaves the artifacts and the registry as they were.

One project runs the whole pipeline once (tiny model, a promoted champion); then each bad input runs through the CLI
in-process against it, and the artifacts root and the registry store are hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from conftest import TUNEFLOW, topic_frame, write_params
from tuneflow.artifacts import content_hash

TOPICS = "topics.csv"


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    code: int
    names: str  # the error line must contain this: the file, column or key at fault
    prepare: Callable[[Path], None] = lambda folder: None


def write_bytes(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def write_frame(name: str, frame: pd.DataFrame) -> Callable[[Path], None]:
    return lambda folder: frame.to_csv(folder / name, index=False)


def ingest(source: str, *sets: str) -> list[str]:
    return ["ingest", "--set", f"data.source=bad/{source}", *(item for value in sets for item in ("--set", value))]


def train(*sets: str) -> list[str]:
    return ["train", *(item for value in sets for item in ("--set", value))]


def symlink_loop(folder: Path) -> None:
    (folder / "loop" / "a").mkdir(parents=True)
    (folder / "loop" / "a" / "self").symlink_to(folder / "loop" / "a", target_is_directory=True)


def topics_with(**columns) -> pd.DataFrame:
    return topic_frame(10).assign(**columns)


def one_class() -> pd.DataFrame:
    return topic_frame(10).assign(label="only")


def with_rare_class() -> pd.DataFrame:
    return pd.concat([topic_frame(10), pd.DataFrame([{"text": "a single lonely example", "label": "rare"}])])


def with_10mb_text() -> pd.DataFrame:
    return pd.concat([topic_frame(10), pd.DataFrame([{"text": "goal " * (2 * 1024 * 1024), "label": "sport"}])])


def five_classes_three_rows() -> pd.DataFrame:
    return pd.DataFrame([{"text": f"class {label} sample {row} " + " ".join(f"w{label}{word}" for word in range(row, row + 5)),
                          "label": f"c{label}"} for label in range(5) for row in range(3)])


def gated(name: str, source: str, frame: Callable[[], pd.DataFrame], names: str) -> Case:
    """`validate` of `frame`, a failed data gate (exit 3). `frame` is ingested first into an artifacts root of its own,
    bad/bad-<stem>: ingest writes, and the gate publishes its evidence there, never into the project's root."""
    sets = [item for value in (f"data.source=bad/{source}", f"artifacts=bad/bad-{Path(source).stem}") for item in ("--set", value)]

    def prepare(folder: Path) -> None:
        from cli.main import main

        frame().to_csv(folder / source, index=False)
        assert main(["ingest", *sets]) == 0, f"ingest of bad/{source}"

    return Case(name, ["validate", *sets], 3, names, prepare)


CASES = [
    # data
    Case("empty file", ingest("empty.csv"), 2, "empty.csv", write_bytes("empty.csv", b"")),
    Case("header only", ingest("header.csv"), 2, "header.csv", write_bytes("header.csv", b"text,label\n")),
    Case("binary file", ingest("binary.csv"), 2, "binary.csv", write_bytes("binary.csv", b"text,label\n\x00\x01\x02\xff" * 50)),
    Case("not the declared encoding", ingest("latin.csv"), 2, "latin.csv",
         write_bytes("latin.csv", "text,label\n".encode() + "café crème brûlée,a\n".encode("latin-1") * 40)),
    Case("unknown encoding", ingest(TOPICS, "data.encoding=klingon"), 2, "data.encoding"),
    Case("label column all NaN", ingest("nan.csv"), 2, "data.label_column", write_frame("nan.csv", topics_with(label=float("nan")))),
    Case("one class only", ingest("one.csv"), 2, "'only'", write_frame("one.csv", one_class())),
    Case("duplicate column names", ingest("dup.csv"), 2, "label",
         write_bytes("dup.csv", b"text,label,label\n" + b"some words here,a,b\nother words there,b,a\n" * 20)),
    Case("text column not found", ingest(TOPICS, "data.text_column=body"), 2, "data.text_column"),
    Case("column index out of range", ingest(TOPICS, "data.text_column=7", "data.label_column=1"), 2, "data.text_column"),
    Case("source file not found", ingest("absent.csv"), 2, "absent.csv"),
    Case("unsupported extension", ingest("data.txt"), 2, "data.format", write_bytes("data.txt", b"text\tlabel\nx\ty\n")),
    Case("a broken JSONL line", ingest("bad.jsonl"), 2, "bad.jsonl:2",
         write_bytes("bad.jsonl", b'{"text": "fine", "label": "a"}\n{"text": oops}\n')),
    Case("a broken parquet file", ingest("bad.parquet"), 2, "bad.parquet", write_bytes("bad.parquet", b"PAR1 not really")),
    Case("slice column not found", ingest(TOPICS, "data.slice_columns=[region]"), 2, "data.slice_columns"),
    Case("a symlink loop in a folder source", ingest("loop"), 2, "loop", symlink_loop),
    Case("data.sample leaves one row for two splits", ingest(TOPICS, "data.sample=29"), 2, "data.sample"),
    Case("a one-row class with data.sample", ingest("rare.csv", "data.sample=20"), 2, "'rare'", write_frame("rare.csv", with_rare_class())),
    Case("a one-row class", ingest("rare.csv"), 2, "'rare'", write_frame("rare.csv", with_rare_class())),
    # data the data gate refuses (exit 3): ingested into a root of their own first
    gated("a 10 MB single text", "long.csv", with_10mb_text, "text_length"),
    gated("5 classes x 3 rows", "five.csv", five_classes_three_rows, "test_label_coverage"),
    # params and command line
    Case("--params is a folder", ["--params", "bad", "ingest"], 2, "bad: is a folder"),
    Case("--params is not UTF-8", ["--params", "bad/latin.yaml", "ingest"], 2, "latin.yaml: not UTF-8",
         write_bytes("latin.yaml", "data:\n  source: café.csv\n".encode("latin-1"))),
    Case("--params is not YAML", ["--params", "bad/broken.yaml", "ingest"], 2, "broken.yaml: not valid YAML",
         write_bytes("broken.yaml", b"data: [unclosed\n")),
    Case("--params is a list", ["--params", "bad/list.yaml", "ingest"], 2, "list.yaml", write_bytes("list.yaml", b"- a\n- b\n")),
    Case("unknown key", train("train.bogus=1"), 2, "train.bogus"),
    Case("wrong type", train("train.epochs=many"), 2, "train.epochs"),
    Case("unknown method", train("train.method=magic"), 2, "train.method"),
    Case("--set without a value", train("train.epochs"), 2, "train.epochs"),
    Case("unknown pipeline", ["run", "--pipeline", "nope", "--pipelines-file", "bad/pipelines.yaml"], 2, "nope",
         write_bytes("pipelines.yaml", b"pipelines:\n  fast:\n    set:\n      train.epochs: 1\n")),
    Case("pipelines.yaml with a default key", ["run", "--pipeline", "fast", "--pipelines-file", "bad/default.yaml"], 2, "default",
         write_bytes("default.yaml", b"default:\n  train.epochs: 1\npipelines:\n  fast: {}\n")),
    Case("unknown method to compare", ["compare", "--methods", "lora,magic"], 2, "--methods"),
    Case("artifacts root is a folder tuneflow did not create", ["ingest", "--set", "artifacts=bad/mine"], 2, "artifacts",
         lambda folder: ((folder / "mine" / "data").mkdir(parents=True), (folder / "mine" / "data" / "thesis.tex").write_text("x"))),
    # model
    Case("a local model path that does not exist", train("model.base=./no-such-model"), 2, "model.base"),
    Case("a mistyped folder taken for a hub id", train("model.base=bad/no-such-model"), 2, "model.base"),
    Case("a hub id that cannot be reached", train("model.base=nobody/no-such-model"), 2, "model.base"),
    Case("a folder that is not a model", train("model.base=bad"), 2, "model.base"),
    Case("LoRA target modules the model does not have", train("train.lora.target_modules=[nonexistent]"), 2,
         "train.lora.target_modules"),
    Case("IA3 target modules the model does not have", train("train.method=ia3", "train.ia3.target_modules=[nope]",
                                                             "train.ia3.feedforward_modules=[]"), 2, "train.ia3.target_modules"),
    Case("more blocks to unfreeze than the model has", train("train.method=partial", "train.unfreeze_layers=5"), 2,
         "train.unfreeze_layers"),
    # stage order: a fresh artifacts root has nothing the stage needs
    Case("export before train", ["export", "--set", "artifacts=fresh"], 2, "tuneflow train"),
    Case("evaluate before export", ["evaluate", "--set", "artifacts=fresh"], 2, "tuneflow"),
    Case("promote before evaluate", ["promote", "--set", "artifacts=fresh"], 2, "tuneflow"),
    # registry
    Case("rollback of a model without a champion", ["registry", "rollback", "nobody", "--reason", "x"], 2, "nobody"),
    Case("history of a model that does not exist", ["registry", "history", "nobody"], 2, "nobody"),
    Case("forced promotion of a version that does not exist", ["registry", "promote", "tiny", "99", "--force", "--reason", "x"], 2, "99"),
    Case("forced promotion without --force", ["registry", "promote", "tiny", "1", "--reason", "x"], 2, "--force"),
]


# the artifacts root, the registry database and its artifact store: mlruns/, where an MLflow client on a SQLite
# store puts the runs' and the models' files (mlartifacts/ is `mlflow server`'s default, absent here)
STATE = ("artifacts", "mlflow.db", "mlruns")


def state_hash(project: Path) -> str:
    """The project's state (STATE), byte for byte."""
    parts = {name: content_hash(project / name) for name in STATE}
    assert None not in parts.values(), parts  # an absent part hashes the same before and after: it would prove nothing
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@pytest.fixture(scope="module")
def project(tiny_model, tmp_path_factory):
    """A project after one whole pipeline run on a tiny model: every artifact folder and a champion exist."""
    from cli.main import main

    folder = tmp_path_factory.mktemp("bad-inputs")
    topic_frame(10).to_csv(folder / TOPICS, index=False)
    write_params(folder, data={"source": TOPICS}, model={"base": str(tiny_model), "max_length": 32},
                 train={"epochs": 1, "batch_size": 8, "learning_rate": 5e-3},
                 evaluate={"latency_warmup": 2, "min_accuracy": 0.0, "min_macro_f1": 0.0, "pytorch_reference": False,
                           "min_slice_support": 1000},
                 promote={"model_name": "tiny"})
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        patch.setenv("HF_HUB_OFFLINE", "1")
        for stage in ("ingest", "validate", "train", "export", "champion", "evaluate", "promote"):
            assert main([stage]) == 0, stage
        (folder / "bad").mkdir()
        topic_frame(10).to_csv(folder / "bad" / TOPICS, index=False)
        yield folder


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_input_is_one_line_and_changes_nothing(project, case, capsys):
    from cli.main import main

    scratch = project / "bad"
    case.prepare(scratch)
    before = state_hash(project)
    code = main(case.argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("tuneflow: ")]
    assert code == case.code, captured.err
    assert len(errors) == 1 and errors[0].startswith("tuneflow: error: "), captured.err
    assert case.names in errors[0]
    assert "Traceback" not in captured.err + captured.out
    assert state_hash(project) == before
    assert not (project / "fresh").exists()  # a stage refused on a new root leaves no root behind


def prefect_run(project: Path, *sets: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "PREFECT_HOME": str(project / ".prefect")}
    return subprocess.run([str(TUNEFLOW), "run", *(item for value in sets for item in ("--set", value))], cwd=project,
                          capture_output=True, text=True, env=environment, timeout=600)


@pytest.mark.slow
def test_under_prefect_a_user_error_or_a_failed_gate_prints_no_traceback(project):
    """`tuneflow run`: Prefect logs the failure (the UI records it) but prints no traceback; the last line is the error."""
    before = state_hash(project)
    bad_source = prefect_run(project, "data.source=bad/absent.csv")
    assert bad_source.returncode == 2
    assert bad_source.stderr.strip().splitlines()[-2:][0].startswith("tuneflow: error: bad/absent.csv")
    assert state_hash(project) == before

    frame = topic_frame(30)  # 30 rows a class; keep 3 "music" rows: the data gate refuses a 10:1 imbalance
    frame[(frame.label != "music") | (frame.index % 30 < 3)].to_csv(project / "bad" / "imbalanced.csv", index=False)
    gate = prefect_run(project, "data.source=bad/imbalanced.csv", "artifacts=gated-out")
    assert gate.returncode == 3, gate.stderr[-2000:]
    for result in (bad_source, gate):
        output = result.stdout + result.stderr
        assert "Traceback" not in output and "NoneType: None" not in output
        assert "Finished in state Failed" in output  # Prefect still records the failure
    assert [line for line in gate.stderr.splitlines() if line.startswith("tuneflow: ")][0].startswith("tuneflow: error: ")


def test_serving_a_champion_whose_artifact_is_missing_is_one_line(project, capsys, monkeypatch):
    """The registry still names @champion but its files are gone from the artifact store: `serve` exits 1 with one line,
    and leaves the artifacts and the registry byte for byte as they were (the table's case, with a store to restore)."""
    import uvicorn

    from cli.main import main
    from tuneflow.registry import CHAMPION, Registry

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("the server started without its champion"))
    registry = Registry()
    champion = registry.by_alias("tiny", CHAMPION)
    store = Path(registry.client.get_model_version_download_uri("tiny", champion.version).removeprefix("file://"))
    aside = store.with_name(store.name + ".aside")
    capsys.readouterr()
    store.rename(aside)
    try:
        before = state_hash(project)  # with the store aside: what `serve` must not touch
        code = main(["serve", "--model", "tiny", "--port", "1"])
        after = state_hash(project)
    finally:
        aside.rename(store)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("tuneflow: ")]
    assert code == 1 and len(errors) == 1 and errors[0].startswith("tuneflow: error: "), captured.err
    assert f"tiny v{champion.version}" in errors[0], errors
    assert "Traceback" not in captured.err + captured.out
    assert after == before
