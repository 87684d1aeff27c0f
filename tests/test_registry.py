"""Promotion that happens whole or not at all, the alias history, rollback and forced promotion, registry errors."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cli.main import main
from conftest import topic_frame
from pipeline.runner import run_stage
from pipeline.table import STAGES
from test_stages import run_until, tiny_params
from tuneflow import artifacts as a
from tuneflow.config import Params
from tuneflow.errors import InputError
from tuneflow.registry import (CHALLENGER, CHAMPION, PROMOTION_TAG, Registry, RegistryError, champion_stack, redact,
                               safe_key)

REPO = Path(__file__).resolve().parents[1]


def promote_decision(params: Params, registry: Registry | None = None) -> dict:
    from tasks.promote import promote

    root = Path(params.artifacts)
    result = promote(params, root / a.VALIDATION, root / a.MODEL, root / a.EXPORT, root / a.EVAL, root / a.PROMOTION,
                     registry=registry)
    if result.failure(root / a.PROMOTION):
        raise result.failure(root / a.PROMOTION)
    return json.loads((root / a.PROMOTION / a.DECISION).read_text())


def reseeded(params: Params, seed: int = 7) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})


def evaluated(params: Params) -> None:
    for name in ("train", "export", "champion", "evaluate"):
        run_stage(STAGES[name], params)


def test_safe_key_makes_valid_distinct_mlflow_names():
    from mlflow.utils.validation import _validate_metric_name

    labels = ["sport", "C++", "a&b", "a|b", "日本語", "naïve label", "../x", ""]
    keys = [safe_key("test_f1_", label) for label in labels]
    for key in keys:
        _validate_metric_name(key)
    assert keys[0] == "test_f1_sport" and len(set(keys)) == len(keys)


def test_redact_drops_credentials_query_and_fragment():
    assert redact("http://alice:s3cret@host:5000/api?token=abc#x") == "http://***@host:5000/api"
    assert redact("https://token@host/") == "https://***@host/"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_by_alias_absent_is_none_any_other_error_is_one_line(workdir, monkeypatch):
    from mlflow.exceptions import MlflowException

    registry = Registry()
    assert registry.by_alias("nothing-here", CHAMPION) is None  # no such model
    registry.client.create_registered_model("empty")
    assert registry.by_alias("empty", CHAMPION) is None  # no such alias

    def denied(*_args, **_kwargs):
        raise MlflowException("Permission denied for user bob", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(registry.client, "get_model_version_by_alias", denied)
    with pytest.raises(RegistryError, match=r"reading empty@champion failed: Permission denied"):
        registry.by_alias("empty", CHAMPION)


def test_an_unreachable_registry_stops_the_stage_with_one_line(workdir, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:hunter2@127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    assert main(["champion", "--set", "promote.model_name=tiny"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tuneflow:")]
    assert len(errors) == 1 and "registry http://***@127.0.0.1:9: reading tiny@champion failed" in errors[0], err
    assert "Traceback" not in err and "hunter2" not in err and not (workdir / "artifacts" / "champion").exists()


def test_the_lock_serialises_writers_and_breaks_a_stale_one(workdir):
    registry = Registry()
    order, never_released = [], registry.lock("m")
    with registry.lock("m"):
        waiter = threading.Thread(target=lambda: (never_released.__enter__(), order.append("second")))
        waiter.start()
        waiter.join(0.8)
        order.append("first")
        assert waiter.is_alive()  # still waiting for the lock
    waiter.join(10)
    assert order == ["first", "second"]
    with pytest.raises(RegistryError, match="m is locked by another promotion"):
        with registry.lock("m", wait_s=0.5):
            pass
    with registry.lock("m", stale_s=0.0):  # the holder above never released it: stale, broken
        assert registry.models() == []  # the lock is not a model
    assert "m" + ".tuneflow-lock" not in [model.name for model in registry.client.search_registered_models()]


def test_champion_stack_follows_promotions_rollbacks_and_reverts():
    def move(to, action="promote", frm=None):
        return {"alias": CHAMPION, "from_version": frm, "to_version": to, "action": action}

    history = [move("1"), move("2"), move("3"), {"alias": CHALLENGER, "to_version": "4", "action": "promote"},
               move("3", "refused"), move("2", "rollback"), move("4", "force"), move("2", "revert")]
    assert champion_stack(history) == ["1", "2"]
    assert champion_stack(history + [move("1", "rollback")]) == ["1"]
    assert champion_stack([move("1"), move(None, "revert")]) == []


@pytest.fixture(scope="module")
def candidates(tiny_model, tmp_path_factory):
    """A workdir where v1 is champion and a second, different model is evaluated against it and ready to promote."""
    folder = tmp_path_factory.mktemp("registry")
    old = Path.cwd()
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        params = tiny_params(tiny_model, folder)
        run_until(params, "promote")
        second = reseeded(params)
        evaluated(second)
    finally:
        os.chdir(old)
        del os.environ["MLFLOW_TRACKING_URI"]
    return folder, second


@pytest.fixture
def ready(candidates, tmp_path, monkeypatch):
    """A private copy of the `candidates` workdir: its own registry database and artifacts root."""
    snapshot, second = candidates
    target = tmp_path / "work"
    shutil.copytree(snapshot, target)
    monkeypatch.chdir(target)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{target / 'mlflow.db'}")
    return target, second.model_copy(update={"artifacts": str(target / "artifacts")})


class Flaky(Registry):
    """Fails the n-th call (from 1) of one method, after the real call where `after` (registered, then failed)."""

    def __init__(self, method: str, nth: int, after: bool = False):
        super().__init__()
        self.method, self.nth, self.after, self.calls = method, nth, after, 0
        real = getattr(super(), method)

        def flaky(*args, **kwargs):
            self.calls += 1
            if self.calls == self.nth and not self.after:
                raise RegistryError(f"registry test: injected failure in {method}")
            result = real(*args, **kwargs)
            if self.calls == self.nth:
                raise RegistryError(f"registry test: injected failure in {method}")
            return result

        setattr(self, method, flaky)


STEPS = [("log_candidate", 1, False), ("log_candidate", 1, True), ("tag_version", 1, False), ("set_alias", 1, False),
         ("append_history", 1, False), ("set_alias", 2, False), ("append_history", 2, False), ("tag_version", 2, False)]


@pytest.mark.slow
def test_a_failure_at_any_step_leaves_champion_where_it_was_and_the_retry_reuses_the_version(ready):
    workdir, second = ready
    registry = Registry()
    before = registry.aliases("tiny")
    assert before == {CHAMPION: "1", CHALLENGER: "1"}
    for method, nth, after in STEPS:
        with pytest.raises(RegistryError, match=f"injected failure in {method}"):
            promote_decision(second, Flaky(method, nth, after))
        step = f"{method} #{nth}{' (after)' if after else ''}"
        assert registry.aliases("tiny") == before, step
        assert champion_stack(registry.history("tiny")) == ["1"], step
        decision = json.loads((workdir / "artifacts" / a.PROMOTION / a.DECISION).read_text())
        assert not decision["promoted"] and decision["alias"] is None and "injected failure" in decision["failed"], step
        registered = [version.version for version in registry.versions("tiny")]
        assert registered in (["1"], ["1", "2"]), step  # never a duplicate
        if registered == ["1", "2"]:
            assert registry.get("tiny", "2").tags[PROMOTION_TAG].startswith("failed: registry test: injected failure"), step
    decision = promote_decision(second)
    assert decision["promoted"] and decision["version"] == "2" and "reused, nothing registered" in decision["reasons"][0]
    assert [version.version for version in registry.versions("tiny")] == ["1", "2"]
    assert registry.aliases("tiny") == {CHAMPION: "2", CHALLENGER: "2"}
    assert registry.get("tiny", "2").tags[PROMOTION_TAG] == "done"
    moves = [(entry["alias"], entry["from_version"], entry["to_version"], entry["action"]) for entry in registry.history("tiny")]
    assert moves[:2] == [(CHALLENGER, None, "1", "promote"), (CHAMPION, None, "1", "promote")]
    assert moves[-2:] == [(CHALLENGER, "1", "2", "promote"), (CHAMPION, "1", "2", "promote")]
    assert ("challenger", "2", "1", "revert") in moves  # a challenger move undone when the champion move failed


@pytest.mark.slow
def test_the_registry_cli_lists_shows_rolls_back_and_forces(ready, capsys, monkeypatch):
    workdir, second = ready
    registry = Registry()
    assert promote_decision(second)["promoted"]
    capsys.readouterr()

    assert main(["registry", "list"]) == 0
    assert capsys.readouterr().out.strip() == "tiny  2 version(s)  @challenger=v2, @champion=v2"
    assert main(["registry", "show", "tiny"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[1].startswith("v2") and "@champion" in shown[1] and "verdict=passed" in shown[1]
    assert main(["registry", "show", "tiny", "2"]) == 0
    tags = capsys.readouterr().out
    for key in ("data_hash", "split_salt", "git_commit", "params_hash", "method", "base_model", "base_model_sha256",
                "onnx_sha256", "onnx_opset", "shipped_file", "verdict_summary", "stage_hashes"):
        assert f"  {key}: " in tags, key
    base_sha = registry.get("tiny", "2").tags["base_model_sha256"]
    from tuneflow.artifacts import content_hash
    assert base_sha == content_hash(Path(second.model.base) / "model.safetensors")
    stage_hashes = json.loads(registry.get("tiny", "2").tags["stage_hashes"])
    assert stage_hashes["model"] == content_hash(Path(second.artifacts) / "model")  # the folder that was trained
    assert "  params (resolved, as trained):\n" in tags and f"      learning_rate: {second.train.learning_rate}" in tags

    monkeypatch.setenv("TUNEFLOW_ACTOR", "carol")
    assert main(["registry", "rollback", "tiny", "--reason", "v2 misroutes sport"]) == 0
    assert registry.aliases("tiny")[CHAMPION] == "1"
    assert main(["registry", "rollback", "tiny", "--reason", "again"]) == 2  # v1 was the first champion
    assert "nothing to roll back to" in capsys.readouterr().err
    assert main(["registry", "promote", "tiny", "2", "--reason", "no force"]) == 2
    assert main(["registry", "promote", "tiny", "2", "--force", "--reason", "hotfix verified by hand"]) == 0
    assert main(["registry", "rollback", "tiny", "--to", "7", "--reason", "x"]) == 2
    assert "v7 was never @champion" in capsys.readouterr().err
    assert registry.aliases("tiny")[CHAMPION] == "2"
    capsys.readouterr()
    assert main(["registry", "history", "tiny", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    champion_moves = [(e["from_version"], e["to_version"], e["action"], e["forced"]) for e in entries if e["alias"] == CHAMPION]
    assert champion_moves == [(None, "1", "promote", False), ("1", "2", "promote", False),
                              ("2", "1", "rollback", False), ("1", "2", "force", True)]
    rollback, forced = [e for e in entries if e["action"] in ("rollback", "force")]
    assert rollback["reason"] == "v2 misroutes sport" and rollback["who"].startswith("carol@")
    assert forced["reason"] == "hotfix verified by hand" and forced["run_id"] == registry.get("tiny", "2").run_id
    assert all(entry["time"] for entry in entries)


@pytest.mark.slow
def test_labels_any_unicode_become_valid_metric_names(tiny_model, workdir):
    frame = topic_frame(30)
    frame["label"] = frame["label"].map({"sport": "C++", "money": "a&b", "music": "日本語 ✓"})
    params = tiny_params(tiny_model, workdir)
    frame.to_csv(params.data.source, index=False)
    layout = run_until(params, "promote")
    decision = json.loads((layout.promotion / a.DECISION).read_text())
    assert decision["promoted"], decision
    registry = Registry()
    metrics = registry.client.get_run(decision["run_id"]).data.metrics
    assert {safe_key("test_f1_", label) for label in ("C++", "a&b", "日本語 ✓")} <= set(metrics)


@pytest.mark.slow
def test_two_promotions_at_once_end_with_one_champion_and_a_consistent_history(tiny_model, workdir, tracking_server):
    """Two processes against one tracking server, the way a team shares a registry."""
    first = tiny_params(tiny_model, workdir)
    run_until(first, "evaluate")
    second = reseeded(first).model_copy(update={"artifacts": str(workdir / "artifacts-b")})
    shutil.copytree(workdir / "artifacts" / a.DATA, workdir / "artifacts-b" / a.DATA)
    run_stage(STAGES["validate"], second)
    evaluated(second)
    for params, file in ((first, "a.yaml"), (second, "b.yaml")):
        (workdir / file).write_text(json.dumps(params.model_dump(mode="json")))
    env = {**os.environ, "TUNEFLOW_ACTOR": "racer"}
    racers = [subprocess.Popen([sys.executable, "-m", "cli", "--params", file, "promote"], cwd=workdir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for file in ("a.yaml", "b.yaml")]
    outcomes = [(racer.wait(timeout=300), racer.stderr.read()) for racer in racers]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser_err = next(err for code, err in outcomes if code == 2)
    errors = [line for line in loser_err.splitlines() if line.startswith("tuneflow:")]
    assert len(errors) == 1 and "compared with champion none, but @champion is v1 now" in errors[0], loser_err
    assert "Traceback" not in loser_err
    registry = Registry()
    assert [version.version for version in registry.versions("tiny")] == ["1"]
    assert registry.aliases("tiny") == {CHAMPION: "1", CHALLENGER: "1"}
    history = registry.history("tiny")
    assert [(e["alias"], e["from_version"], e["to_version"], e["action"]) for e in history] == [
        (CHALLENGER, None, "1", "promote"), (CHAMPION, None, "1", "promote"), (CHAMPION, "1", "1", "refused")]
    assert all(entry["who"].startswith("racer@") for entry in history)


@pytest.fixture
def tracking_server(workdir, monkeypatch):
    """`mlflow server` on loopback (SQLite backend, local artifact root), reached over HTTP with a password in the URI."""
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = workdir / "server"
    store.mkdir()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts"),
                               "--workers", "1"], cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("mlflow server did not start")
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:s3cret@127.0.0.1:{port}")
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_everything_works_against_a_tracking_server_and_no_file_holds_its_password(tiny_model, workdir, tracking_server, capsys):
    """Issue 11's registry work over HTTP, one server start: int8 shipped and tagged, `registry list | show`, a failure
    injected at the @champion move and the retry that reuses the version, rollbacks, a forced promotion, serving."""
    from tuneflow.artifacts import content_hash

    params = tiny_params(tiny_model, workdir)
    params = params.model_copy(update={"export": params.export.model_copy(update={"quantize": "dynamic"})})
    layout = run_until(params, "promote")
    first = json.loads((layout.promotion / a.DECISION).read_text())
    assert first["promoted"] and first["tracking_uri"] == f"http://***@127.0.0.1:{tracking_server}"
    registry = Registry()
    # int8: the shipped file is what the tags name and what a download over HTTP gives
    parity = json.loads((layout.export / a.PARITY).read_text())
    assert parity["onnx_file"] == "model.int8.onnx", parity["quantization"]
    int8_sha = content_hash(layout.export / "model.int8.onnx")
    v1 = registry.get("tiny", "1")
    assert v1.tags["shipped_file"] == "model.int8.onnx" and v1.tags["onnx_sha256"] == int8_sha
    assert content_hash(registry.download(v1, workdir / "download") / "model.onnx") == int8_sha
    capsys.readouterr()
    assert main(["registry", "show", "tiny", "1"]) == 0
    shown = capsys.readouterr().out
    assert "  shipped_file: model.int8.onnx\n" in shown and f"  onnx_sha256: {int8_sha}\n" in shown, shown
    assert f"      learning_rate: {params.train.learning_rate}" in shown  # the run's params, read over HTTP

    second = reseeded(params).model_copy(update={"evaluate": params.evaluate.model_copy(update={"non_inferiority_margin": 1.0})})
    evaluated(second)
    assert json.loads((layout.eval / a.METRICS).read_text())["champion"]["paired"]  # v1 downloaded from the server
    # a failure at the @champion move (after registering v2 and moving @challenger): nothing moves, v2 is marked
    with pytest.raises(RegistryError, match="injected failure in set_alias"):
        promote_decision(second, Flaky("set_alias", 2))
    assert registry.aliases("tiny") == {CHAMPION: "1", CHALLENGER: "1"}
    assert [version.version for version in registry.versions("tiny")] == ["1", "2"]
    assert registry.get("tiny", "2").tags[PROMOTION_TAG].startswith("failed: registry test: injected failure in set_alias")
    failed = json.loads((layout.promotion / a.DECISION).read_text())
    assert not failed["promoted"] and failed["alias"] is None and "injected failure" in failed["failed"]
    capsys.readouterr()
    assert main(["registry", "list"]) == 0
    assert capsys.readouterr().out.strip() == "tiny  2 version(s)  @challenger=v1, @champion=v1"
    assert main(["registry", "show", "tiny"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("v1") and "@champion" in listed[0] and "shipped_file=model.int8.onnx" in listed[0], listed
    assert listed[1].startswith("v2") and "@" not in listed[1] and "promotion=failed: registry test" in listed[1], listed
    retried = promote_decision(second)  # the retry reuses v2: no duplicate
    assert retried["promoted"] and retried["version"] == "2" and "reused, nothing registered" in retried["reasons"][0]
    assert [version.version for version in registry.versions("tiny")] == ["1", "2"]
    v2 = registry.get("tiny", "2")
    assert v2.tags[PROMOTION_TAG] == "done"
    assert v2.tags["shipped_file"] == json.loads((layout.export / a.PARITY).read_text())["onnx_file"]
    assert v2.tags["onnx_sha256"] == content_hash(layout.export / v2.tags["shipped_file"])
    assert registry.aliases("tiny") == {CHAMPION: "2", CHALLENGER: "2"}
    assert main(["registry", "rollback", "tiny", "--reason", "server rollback"]) == 0
    assert registry.by_alias("tiny", CHAMPION).version == "1"
    assert promote_decision(second)["reasons"][0].startswith("the same artifact")  # reused over HTTP too
    assert registry.by_alias("tiny", "no-such-alias") is None
    capsys.readouterr()
    assert main(["registry", "history", "tiny"]) == 0
    assert "rollback  by" in capsys.readouterr().out
    # the server follows the registry over HTTP: v2 again (reused above), then a rollback and a forced promotion
    from test_serving import Workspace, serving

    with serving(Workspace(workdir, layout.export, registry), "tiny", "--poll-seconds", "0") as server:
        assert server.predict(["the striker scored"]).json()["version"] == "2"
        assert main(["registry", "rollback", "tiny", "--reason", "served rollback"]) == 0
        assert server.post("/reload").json()["changed"]
        assert server.predict(["the striker scored"]).json()["version"] == "1"
        assert main(["registry", "promote", "tiny", "2", "--force", "--reason", "forced over HTTP"]) == 0
        assert server.post("/reload").json()["version"] == "2"
        assert server.predict(["the striker scored"]).json()["version"] == "2"
    capsys.readouterr()
    assert main(["registry", "history", "tiny", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    champion_moves = [(e["from_version"], e["to_version"], e["action"], e["forced"]) for e in entries if e["alias"] == CHAMPION]
    assert champion_moves == [(None, "1", "promote", False), ("1", "2", "promote", False), ("2", "1", "rollback", False),
                              ("1", "2", "promote", False), ("2", "1", "rollback", False), ("1", "2", "force", True)]
    assert entries[-1]["reason"] == "forced over HTTP" and entries[-1]["run_id"] == v2.run_id
    assert (CHALLENGER, "2", "1", "revert") in [(e["alias"], e["from_version"], e["to_version"], e["action"]) for e in entries]
    assert registry.aliases("tiny")[CHAMPION] == "2"
    leaked = [path for path in workdir.rglob("*") if path.is_file() and b"s3cret" in path.read_bytes()]
    assert leaked == []


@pytest.mark.slow
def test_promote_refuses_an_export_that_failed_parity(ready):
    workdir, second = ready
    parity_path = Path(second.artifacts) / a.EXPORT / a.PARITY
    parity_path.write_text(json.dumps(json.loads(parity_path.read_text()) | {"passed": False}))
    with pytest.raises(InputError, match="parity.json: the export failed parity; it is never registered"):
        promote_decision(second)
    assert [version.version for version in Registry().versions("tiny")] == ["1"]


@pytest.mark.slow
def test_an_int8_export_is_registered_as_the_file_that_ships(tiny_model, workdir):
    from tuneflow.artifacts import content_hash

    params = tiny_params(tiny_model, workdir)
    params = params.model_copy(update={"export": params.export.model_copy(update={"quantize": "dynamic"})})
    layout = run_until(params, "promote")
    parity = json.loads((layout.export / a.PARITY).read_text())
    assert parity["onnx_file"] == "model.int8.onnx", parity["quantization"]
    registry = Registry()
    champion = registry.by_alias("tiny", CHAMPION)
    assert champion.tags["shipped_file"] == "model.int8.onnx"
    assert champion.tags["onnx_sha256"] == content_hash(layout.export / "model.int8.onnx")
    # what evaluate and the server load from the registry is that very file
    downloaded = registry.download(champion, workdir / "download")
    assert content_hash(downloaded / "model.onnx") == champion.tags["onnx_sha256"]
