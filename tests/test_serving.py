"""`tuneflow serve` over real HTTP on loopback: the server in its own process, a temporary SQLite registry.

One tiny model is trained and exported once; it is registered several times under a few names (each
registration is a new version), and the aliases are moved the way promote, rollback and a forced promotion
move them.
"""

import asyncio
import fnmatch
import json
import os
import posixpath
import re
import shlex
import socket
import subprocess
import threading
import time
import tomllib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO, TUNEFLOW
from test_stages import run_until, tiny_params
from tuneflow import artifacts as a
from tuneflow.artifacts import read_json
from tuneflow.registry import CHAMPION, Registry, Version, force_promote, rollback

LABELS = ["money", "music", "sport"]
TEXTS = ["goal match team league", "market shares profit bank", "album band song concert"]
SERVER_START_S = 90


# ---------------------------------------------------------------------------------------------------------------
# a registry with a tiny exported model, and servers on it


@dataclass(frozen=True)
class Workspace:
    folder: Path
    export_dir: Path
    registry: Registry

    @property
    def uri(self) -> str:
        return self.registry.uri

    def register(self, name: str, with_assets: bool = True) -> Version:
        """A new version of `name` from the export, tagged as promote tags it; without assets it cannot be served."""
        root = self.export_dir.parent
        parity = read_json(self.export_dir / a.PARITY)
        summary = read_json(root / a.MODEL / a.TRAIN_SUMMARY)
        card = read_json(root / a.VALIDATION / a.GATED_DATA / a.DATA_CARD)
        tags = {"method": summary["method"], "base_model": summary["base_model"], "data_hash": card["data_hash"],
                "onnx_sha256": parity["onnx_sha256"]}
        assets = sorted(path for path in (self.export_dir / a.ASSETS).iterdir() if path.is_file()) if with_assets else []
        return self.registry.log_candidate(model_name=name, onnx_path=self.export_dir / parity["onnx_file"], extra_files=assets,
                                           params={}, metrics={}, step_metrics=[], artifacts=[], resolved_params={}, tags=tags)

    def promote(self, version: Version) -> None:
        with self.registry.lock(version.name):
            self.registry.move_alias(version.name, CHAMPION, version.version, reason="test: promoted", run_id=version.run_id)


@pytest.fixture(scope="module")
def workspace(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # MLflow puts the artifacts of new experiments under the working directory
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        params = tiny_params(tiny_model, folder, epochs=1)
        run_until(params, "export")
        yield Workspace(folder, Path(params.artifacts) / a.EXPORT, Registry())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str, **request) -> httpx.Response:
        return httpx.post(self.url + path, timeout=30, **request)

    def predict(self, texts: list[str]) -> httpx.Response:
        return self.post("/predict", json={"texts": texts})

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextmanager
def serving(workspace: Workspace, model_name: str, *options: str):
    """`tuneflow serve` in its own process on a free loopback port, until the block ends."""
    port = free_port()
    log = workspace.folder / f"serve-{model_name}-{port}.log"
    with log.open("w") as output:
        process = subprocess.Popen([str(TUNEFLOW), "serve", "--model", model_name, "--host", "127.0.0.1", "--port", str(port), *options],
                                   cwd=workspace.folder, env={**os.environ, "MLFLOW_TRACKING_URI": workspace.uri},
                                   stdout=output, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{server.log_tail()}"
            assert time.monotonic() < deadline, f"no /health within {SERVER_START_S}s:\n{server.log_tail()}"
            try:
                if server.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(workspace):
    """A server on `served`, whose v1 is champion; polling off."""
    workspace.promote(workspace.register("served"))
    with serving(workspace, "served", "--poll-seconds", "0") as running:
        yield running


def wait_for(condition, timeout_s: float = 90.0, what: str = "condition"):  # generous: a busy CI machine
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout_s}s")


def answering_version(server: Server) -> str | None:
    response = server.predict(TEXTS[:1])
    return response.json()["version"] if response.status_code == 200 else None


def metric(server: Server, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return sample.value
    return 0.0


@dataclass
class Traffic:
    """Threads posting /predict until stopped; each result is (time sent, status or the transport error, version)."""

    server: Server
    threads: int = 4
    results: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self):
        self.workers = [threading.Thread(target=self.send) for _ in range(self.threads)]
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for worker in self.workers:
            worker.join()

    def send(self):
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post("/predict", json={"texts": TEXTS})
                except httpx.TransportError as error:
                    self.results.append((sent, repr(error), None))
                    continue
                version = response.json().get("version") if response.status_code == 200 else None
                self.results.append((sent, response.status_code, version))

    def statuses(self) -> set:
        return {status for _, status, _ in self.results}


# ---------------------------------------------------------------------------------------------------------------
# the endpoints


def test_predict_gives_each_text_a_label_and_probabilities_from_the_registered_model(workspace, server):
    from tuneflow.onnx_runtime import OnnxClassifier
    from tuneflow.scoring import softmax

    response = server.predict(TEXTS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "served" and body["version"] == "1" and len(body["predictions"]) == len(TEXTS)
    expected = softmax(OnnxClassifier.from_export(workspace.export_dir).logits(TEXTS))  # the same model, in this process
    for prediction, row in zip(body["predictions"], expected):
        probabilities = prediction["probabilities"]
        assert list(probabilities) == LABELS and sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert prediction["label"] == max(probabilities, key=probabilities.get) == LABELS[row.argmax()]
        np.testing.assert_allclose(list(probabilities.values()), row, atol=1e-5)


def test_health_ready_and_metadata_name_the_version_and_its_registry_tags(workspace, server):
    assert server.get("/health").json() == {"status": "ok"}
    ready = server.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "model": "served", "version": "1", "last_error": None}
    champion = workspace.registry.by_alias("served", CHAMPION)
    metadata = server.get("/metadata").json()
    assert metadata["model"] == "served" and metadata["version"] == "1" and metadata["run_id"] == champion.run_id
    for key in ("method", "base_model", "data_hash", "onnx_sha256"):
        assert metadata[key] == champion.tags[key] and metadata[key]
    assert metadata["onnx_sha256"] == read_json(workspace.export_dir / a.PARITY)["onnx_sha256"]
    assert metadata["labels"] == LABELS and metadata["limits"] == {"max_texts": 64, "max_chars": 10_000, "max_body_bytes": 4 * 1024 * 1024}


def test_metrics_count_requests_by_endpoint_and_status_and_time_them(server):
    def predict_count(status: str) -> float:
        return metric(server, "tuneflow_http_requests_total", handler="/predict", status=status)

    ok, refused = predict_count("200"), predict_count("422")
    timed = metric(server, "tuneflow_http_request_duration_seconds_count", handler="/predict")
    for _ in range(3):
        assert server.predict(TEXTS).status_code == 200
    assert server.predict([]).status_code == 422
    wait_for(lambda: predict_count("200") == ok + 3 and predict_count("422") == refused + 1, 5, "request counts")
    assert metric(server, "tuneflow_http_request_duration_seconds_count", handler="/predict") == timed + 4
    assert metric(server, "tuneflow_http_request_duration_seconds_bucket", handler="/predict", le="+Inf") == timed + 4
    assert metric(server, "tuneflow_http_request_duration_seconds_bucket", handler="/predict", le="10.0") == timed + 4
    assert metric(server, "tuneflow_model_info", model="served", version="1") == 1.0
    assert metric(server, "tuneflow_predicted_texts_total") >= 3 * len(TEXTS)
    assert server.get("/no-such-page").status_code == 404
    assert wait_for(lambda: metric(server, "tuneflow_http_requests_total", handler="none", status="404"), 5, "404 count") >= 1
    assert server.post("/predict", content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"}).status_code == 413
    assert wait_for(lambda: predict_count("413"), 5, "413 count") >= 1  # refused before the app: still counted
    assert server.get("/metrics").headers["content-type"].startswith("text/plain")


MB = 1024 * 1024
REFUSED = [  # (request, status, a fragment of the reason)
    ({"json": {"texts": []}}, 422, "at least 1 item"),
    ({"json": {"texts": ["goal"] * 65}}, 422, "at most 64 items"),
    ({"json": {"texts": ["x" * 10_001]}}, 422, "at most 10000 characters"),
    ({"json": {"texts": ["goal", "x" * MB]}}, 422, "at most 10000 characters"),  # a 1 MB text
    ({"json": {"texts": [""]}}, 422, "text is empty or only whitespace"),
    ({"json": {"texts": [" \n\t"]}}, 422, "text is empty or only whitespace"),
    ({"json": {"texts": [1]}}, 422, "valid string"),
    ({"json": {"texts": [None]}}, 422, "valid string"),
    ({"json": {"texts": [["nested"]]}}, 422, "valid string"),
    ({"json": {"texts": "one text"}}, 422, "valid list"),
    ({"json": {"texts": {"a": "b"}}}, 422, "valid list"),
    ({"json": {"text": ["goal"]}}, 422, "Field required"),
    ({"json": {"texts": ["goal"], "extra": 1}}, 422, "Extra inputs are not permitted"),
    ({"json": ["goal"]}, 422, "valid dictionary"),
    ({"json": None}, 422, "Field required"),
    ({"content": b'{"texts": ["\\ud800"]}', "headers": {"content-type": "application/json"}}, 422, "unable to parse raw data as a unicode string"),
    ({"content": b"not json at all", "headers": {"content-type": "application/json"}}, 422, "JSON decode error"),
    ({"content": b'{"texts": ["goal"', "headers": {"content-type": "application/json"}}, 422, "JSON decode error"),
    ({"content": b'{"texts": ["\xff\xfe"]}', "headers": {"content-type": "application/json"}}, 400, "error parsing the body"),
    ({"content": b"[" * 100_000, "headers": {"content-type": "application/json"}}, 400, "error parsing the body"),
    ({"content": b'{"texts": ["goal"]}', "headers": {"content-type": "text/plain"}}, 422, "valid dictionary"),
    ({"content": b"x" * (5 * MB), "headers": {"content-type": "application/json"}}, 413, "request body over 4194304 bytes"),
    ({"content": iter([b'{"texts": ["', b"x" * (4 * MB), b'"]}']), "headers": {"content-type": "application/json"}},
     413, "request body over 4194304 bytes"),  # chunked: no Content-Length, counted as it arrives
]


@pytest.mark.parametrize("request_, status, reason", REFUSED, ids=[f"{index}-{case[1]}" for index, case in enumerate(REFUSED)])
def test_bad_requests_get_a_4xx_that_says_why(server, request_, status, reason):
    response = server.post("/predict", **request_)
    assert response.status_code == status, response.text[:1000]
    assert reason in json.dumps(response.json()["detail"]), response.text[:1000]
    assert len(response.content) < 10_000  # the reasons, not the input echoed back


def test_requests_at_the_limits_are_served(server):
    assert server.predict(["goal"] * 64).status_code == 200
    assert server.predict(["é" * 10_000]).status_code == 200


def test_generated_bodies_get_200_or_a_4xx_never_a_5xx(workspace, server):
    """Property-based bodies against the app in this process (same code, no HTTP overhead)."""
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tuneflow.serving import create_app

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                               max_leaves=10)
    bodies = st.one_of(json_values, st.fixed_dictionaries({"texts": json_values}),
                       st.fixed_dictionaries({"texts": st.lists(st.text(max_size=40), max_size=70)}))

    def acceptable(body) -> bool:
        return (isinstance(body, dict) and set(body) == {"texts"} and isinstance(body["texts"], list) and 1 <= len(body["texts"]) <= 64
                and all(isinstance(text, str) and text.strip() for text in body["texts"]))

    with TestClient(create_app("served", workspace.registry, poll_seconds=0)) as client:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(body=bodies)
        def check_json(body):
            response = client.post("/predict", json=body)
            assert response.status_code == (200 if acceptable(body) else 422), (body, response.text)
            if response.status_code == 200:
                assert len(response.json()["predictions"]) == len(body["texts"])
            else:
                assert all(reason["msg"] for reason in response.json()["detail"])

        @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(raw=st.binary(max_size=200))
        def check_bytes(raw):
            response = client.post("/predict", content=raw, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500 or response.status_code == 200, (raw, response.text)

        check_json()
        check_bytes()


# ---------------------------------------------------------------------------------------------------------------
# following the alias


@pytest.mark.slow
def test_reload_follows_a_rollback_while_requests_keep_being_answered(workspace):
    first, second = workspace.register("swapped"), workspace.register("swapped")
    workspace.promote(first)
    workspace.promote(second)
    with serving(workspace, "swapped", "--poll-seconds", "0") as server:
        assert answering_version(server) == "2"
        with Traffic(server) as traffic:
            time.sleep(0.5)
            rollback(workspace.registry, "swapped", reason="test: v2 misbehaves")
            assert workspace.registry.by_alias("swapped", CHAMPION).version == "1"
            time.sleep(0.3)
            assert answering_version(server) == "2"  # polling is off: nothing moves until /reload
            reload = server.post("/reload")
            reload_done = time.monotonic()
            time.sleep(0.5)
        assert reload.status_code == 200 and reload.json() == {"changed": True, "model": "swapped", "version": "1", "last_error": None}
        assert traffic.statuses() == {200}, traffic.statuses()
        assert {version for _, _, version in traffic.results} == {"1", "2"}  # requests ran on both sides of the swap
        assert {version for sent, _, version in traffic.results if sent > reload_done} == {"1"}
        assert metric(server, "tuneflow_model_info", version="1") == 1.0

        # a champion that does not load: the error is reported, v1 keeps serving
        broken = workspace.register("swapped", with_assets=False)
        force_promote(workspace.registry, "swapped", broken.version, reason="test: a version without its tokenizer")
        failed = server.post("/reload")
        assert failed.status_code == 503, failed.text
        assert "swapped v3" in failed.json()["detail"] and "could not be loaded" in failed.json()["detail"]
        assert "still serving v1" in failed.json()["detail"]
        assert answering_version(server) == "1"
        ready = server.get("/ready").json()
        assert ready["ready"] and ready["version"] == "1" and "swapped v3" in ready["last_error"]
        assert "swapped v3" in server.get("/metadata").json()["last_error"]
        assert metric(server, "tuneflow_model_reloads_total", result="failed") == 1.0
        assert "could not be loaded" in server.log_tail()

        rollback(workspace.registry, "swapped", reason="test: back from the broken v3")
        back = server.post("/reload").json()
        assert back == {"changed": False, "model": "swapped", "version": "1", "last_error": None}


@pytest.mark.slow
def test_without_a_champion_it_starts_unready_and_polling_picks_up_promotions_and_rollbacks(workspace):
    with serving(workspace, "polled", "--poll-seconds", "0.3") as server:
        assert server.get("/health").status_code == 200
        ready = server.get("/ready")
        assert ready.status_code == 503 and not ready.json()["ready"] and ready.json()["version"] is None
        assert "models:/polled@champion does not exist" in ready.json()["reason"]
        refused = server.predict(TEXTS)
        assert refused.status_code == 503 and "models:/polled@champion does not exist" in refused.json()["detail"]
        assert server.get("/metadata").status_code == 503

        first = workspace.register("polled")
        workspace.promote(first)
        assert wait_for(lambda: answering_version(server), what="the first champion served") == "1"
        assert server.get("/ready").status_code == 200
        second = workspace.register("polled")
        with Traffic(server) as traffic:
            workspace.promote(second)
            wait_for(lambda: answering_version(server) == "2", what="v2 served after its promotion")
            rollback(workspace.registry, "polled", reason="test: back to v1")
            wait_for(lambda: answering_version(server) == "1", what="v1 served after the rollback")
            time.sleep(0.3)
        assert traffic.statuses() == {200}, traffic.statuses()
        assert {version for _, _, version in traffic.results} == {"1", "2"}


def test_an_unreachable_registry_stops_the_server_with_one_line(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://bob:hunter2@127.0.0.1:9",  # discard port: connection refused
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    result = subprocess.run([str(TUNEFLOW), "serve", "--model", "anything", "--port", str(free_port())], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("tuneflow:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert errors[0].startswith("tuneflow: error: registry http://***@127.0.0.1:9"), errors
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr + result.stdout


def test_the_serve_command_and_its_defaults():
    from cli.main import build_parser
    from cli.serve import DEFAULT_LIMITS
    from tuneflow.serving import Limits

    args = build_parser().parse_args(["serve", "--model", "reviews"])
    assert (args.model, args.host, args.port, args.poll_seconds) == ("reviews", "127.0.0.1", 8000, 10.0)
    assert {key: getattr(args, key) for key in DEFAULT_LIMITS} == asdict(Limits()) == DEFAULT_LIMITS
    assert DEFAULT_LIMITS == {"max_texts": 64, "max_chars": 10_000, "max_body_bytes": 4 * 1024 * 1024} and args.onnx_threads == 1


# ---------------------------------------------------------------------------------------------------------------
# the container: deploy/server/Dockerfile read the way `docker build` reads it (stdlib only: no docker here)

DOCKERFILE_KEYWORDS = frozenset({"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                                 "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"})


@dataclass(frozen=True)
class Instruction:
    line: int  # where it starts
    keyword: str
    arguments: str

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form's list, or None for the shell form."""
        text = self.arguments.strip()
        return json.loads(text) if text.startswith("[") else None


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions as the Dockerfile parser sees them: comment and blank lines dropped (inside a continuation
    too), lines ending in the escape character (`\\`, or the `# escape=` directive's) joined to the next."""
    escape, lines = "\\", text.splitlines()
    for line in lines:  # parser directives: `# key=value` lines at the very top
        directive = re.fullmatch(r"#\s*(\w+)\s*=\s*(\S+)\s*", line)
        if directive is None:
            break
        if directive[1].lower() == "escape":
            escape = directive[2]
    instructions, pending, start = [], "", 0
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not pending:
            start = number
        if line.rstrip().endswith(escape):
            pending += line.rstrip()[:-len(escape)]
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        assert "<<" not in arguments, f"Dockerfile line {start}: a heredoc; this test does not read those"
        instructions.append(Instruction(start, keyword, arguments.strip()))
        pending = ""
    assert not pending, f"Dockerfile line {start}: the file ends inside a continuation"
    return instructions


def dockerignore_rules(path: Path) -> list[tuple[re.Pattern, bool]]:
    """(pattern, excludes) per line, in order: Go's filepath.Match syntax plus `**`, `!` for an exception."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, index = "", 0
        while index < len(pattern):
            char = pattern[index]
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
                continue
            if pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
                continue
            if char == "*":
                regex += "[^/]*"
            elif char == "?":
                regex += "[^/]"
            elif char == "[":
                close = pattern.index("]", index + 1)
                regex, index = regex + "[" + pattern[index + 1:close].replace("\\", "\\\\") + "]", close + 1
                continue
            elif char == "\\" and index + 1 < len(pattern):
                regex, index = regex + re.escape(pattern[index + 1]), index + 2
                continue
            else:
                regex += re.escape(char)
            index += 1
        rules.append((re.compile(regex), excludes))
    return rules


def excluded(relative: str, rules: list[tuple[re.Pattern, bool]]) -> bool:
    """Whether the build context leaves `relative` out: the last rule matching it or one of its parent folders wins
    (how moby's patternmatcher decides)."""
    parts = relative.split("/")
    candidates = [relative] + ["/".join(parts[:depth]) for depth in range(1, len(parts))]
    verdict = False
    for regex, excludes in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            verdict = excludes
    return verdict


def documented_build(readme: Path) -> tuple[str, str]:
    """(the -f Dockerfile, the context) of the README's `docker build` command."""
    command = next(line.split() for line in readme.read_text().splitlines() if line.strip().startswith("docker build"))
    return command[command.index("-f") + 1], command[-1]


def image_files(instructions: list[Instruction], context: Path, rules) -> tuple[dict[str, str], list[str], tuple | None]:
    """What the COPY instructions put where (context-relative file -> path in the image), every problem found (an
    unknown instruction, a COPY source that is missing or left out of the context), and where `pip install .` runs
    with what was in place by then (None if it never does)."""
    placed, problems, workdir, install = {}, [], "/", None
    for instruction in instructions:
        keyword = instruction.keyword.upper()
        where = f"Dockerfile line {instruction.line}"
        if keyword not in DOCKERFILE_KEYWORDS:
            problems.append(f"{where}: {instruction.keyword} is not a Dockerfile instruction")
        elif keyword == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, instruction.arguments))
        elif keyword in ("COPY", "ADD"):
            words = instruction.exec_form() or shlex.split(instruction.arguments)
            flags = [word for word in words if word.startswith("--")]
            *sources, destination = [word for word in words if not word.startswith("--")]
            if any(flag.startswith("--from") for flag in flags):
                continue  # from another stage or image: not the build context
            target = posixpath.normpath(posixpath.join(workdir, destination))
            into_folder = destination.endswith("/") or len(sources) > 1
            for source in sources:
                relative = posixpath.normpath(source).lstrip("/")
                matches = sorted(str(path.relative_to(context)) for path in context.glob(relative)) \
                    if any(char in relative for char in "*?[") else [relative] if (context / relative).exists() else []
                if not matches:
                    problems.append(f"{where}: COPY source {source} does not exist in the build context {context}")
                for match in matches:
                    if excluded(match, rules):
                        problems.append(f"{where}: COPY source {match} is excluded by the .dockerignore")
                    elif (context / match).is_dir():
                        for path in sorted((context / match).rglob("*")):
                            inner = str(path.relative_to(context))
                            if path.is_file() and not excluded(inner, rules):
                                placed[inner] = posixpath.join(target, str(path.relative_to(context / match)))
                    else:
                        placed[match] = posixpath.join(target, posixpath.basename(match)) if into_folder else target
        elif keyword == "RUN" and re.search(r"\bpip install \.(\s|$)", instruction.arguments):
            install = install or (workdir, dict(placed))
    return placed, problems, install


def setuptools_packages(repo: Path) -> dict[str, list[str]]:
    """pyproject.toml's `[tool.setuptools.packages.find]` as setuptools applies it (namespace packages, fnmatch on
    dotted names, no folder with a dot in its name): package -> its modules, relative to the repository."""
    find = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    include, exclude = find.get("include", ["*"]), find.get("exclude", [])
    packages: dict[str, list[str]] = {}

    def walk(folder: Path, prefix: str) -> None:
        for child in sorted(path for path in folder.iterdir() if path.is_dir()):
            if "." in child.name or child.name == "__pycache__":
                continue
            package = prefix + child.name
            if any(fnmatch.fnmatchcase(package, pattern) for pattern in include) and \
                    not any(fnmatch.fnmatchcase(package, pattern) for pattern in exclude):
                packages[package] = sorted(str(path.relative_to(repo)) for path in child.glob("*.py"))
            walk(child, package + ".")

    for where in find.get("where", ["."]):
        walk(repo / where, "")
    return packages


def dockerfile_problems(repo: Path) -> list[str]:
    """Everything wrong with the server image as the README builds it: [] when nothing is."""
    file, context_name = documented_build(repo / "README.md")
    dockerfile, context = repo / file, (repo / context_name).resolve()
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")  # BuildKit prefers it to the context's one
    ignore = ignore if ignore.exists() else context / ".dockerignore"
    rules = dockerignore_rules(ignore) if ignore.exists() else []
    instructions = dockerfile_instructions(dockerfile.read_text())
    _, problems, install = image_files(instructions, context, rules)
    if install is None:
        return problems + ["no RUN pip install . (the project is never installed)"]
    install_dir, placed = install
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    needed = ["pyproject.toml", project["readme"]] + [module for modules in setuptools_packages(repo).values() for module in modules]
    for relative in needed:
        if placed.get(relative) != posixpath.join(install_dir, relative):
            problems.append(f"{relative} is not at {posixpath.join(install_dir, relative)} in the image when `pip install .` "
                            f"runs (COPY puts it at {placed.get(relative)})")
    return problems


def test_the_dockerfile_builds_from_the_repository_and_installs_every_package():
    """Each instruction is a Dockerfile instruction, each COPY source exists and is in the build context (its
    .dockerignore), and every module of every package pyproject.toml installs is in place when `pip install .` runs."""
    assert setuptools_packages(REPO).keys() == {"cli", "flows", "pipeline", "tasks", "tuneflow"}  # the walk finds them
    assert dockerfile_problems(REPO) == []


def test_the_dockerfile_installs_the_pinned_cpu_torch_and_runs_the_server():
    text = (REPO / "deploy" / "server" / "Dockerfile").read_text()
    instructions = dockerfile_instructions(text)
    by_keyword = {}
    for instruction in instructions:
        by_keyword.setdefault(instruction.keyword, []).append(instruction)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    torch_pin = next(requirement for requirement in project["dependencies"] if requirement.startswith("torch=="))
    assert text.startswith("#") and "MLFLOW_TRACKING_URI" in text  # the header says how to build and point it at a registry
    assert instructions[0].keyword == "FROM" and instructions[0].arguments == "python:3.11-slim"
    assert project["requires-python"] == ">=3.11,<3.12"  # the base image's Python
    runs = [instruction.arguments for instruction in by_keyword["RUN"]]
    torch_runs = [index for index, run in enumerate(runs) if f"pip install {torch_pin} " in run]
    project_runs = [index for index, run in enumerate(runs) if re.search(r"\bpip install \.(\s|$)", run)]
    assert torch_runs and project_runs, runs
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_runs[0]]
    assert torch_runs[0] < project_runs[0]  # the CPU build first: `pip install .` then finds the pin satisfied
    (entrypoint,) = by_keyword["ENTRYPOINT"]
    assert entrypoint.exec_form() == ["tuneflow", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert [instruction.arguments for instruction in by_keyword["EXPOSE"]] == ["8000"]
    assert by_keyword["USER"][-1].arguments not in ("root", "0")
    (healthcheck,) = by_keyword["HEALTHCHECK"]
    assert "http://127.0.0.1:8000/ready" in healthcheck.arguments and "--interval=10s" in healthcheck.arguments


# ---------------------------------------------------------------------------------------------------------------
# load


@pytest.mark.slow
def test_load_at_concurrency_1_8_and_32_gets_no_5xx(server):
    """10,000 requests from one client on loopback, one in ten invalid: every valid one 200, every invalid one 422."""

    async def run(concurrency: int, requests: int) -> list[tuple[int, int, float]]:
        results = []

        async def worker(client: httpx.AsyncClient, first: int):
            for index in range(first, requests, concurrency):
                body = {"texts": []} if index % 10 == 9 else {"texts": [TEXTS[index % len(TEXTS)]]}
                started = time.perf_counter()
                response = await client.post("/predict", json=body)
                results.append((index, response.status_code, time.perf_counter() - started))

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            await asyncio.gather(*(worker(client, first) for first in range(concurrency)))
        return results

    for concurrency, requests in ((1, 2_000), (8, 4_000), (32, 4_000)):
        started = time.perf_counter()
        results = asyncio.run(run(concurrency, requests))
        elapsed = time.perf_counter() - started
        assert len(results) == requests
        wrong = [(index, status) for index, status, _ in results if status != (422 if index % 10 == 9 else 200)]
        assert wrong == [], wrong[:10]
        latencies_ms = np.array([seconds for _, _, seconds in results]) * 1000
        print(f"concurrency {concurrency}: {requests} requests in {elapsed:.1f}s ({requests / elapsed:.0f}/s), "
              f"P50 {np.percentile(latencies_ms, 50):.1f} ms, P99 {np.percentile(latencies_ms, 99):.1f} ms")
    assert metric(server, "tuneflow_http_requests_total", handler="/predict", status="500") == 0
