"""HTTP inference for a registered model's champion: a FastAPI app over ONNX Runtime that follows the alias.
Texts longer than the model's max_length are windowed and pooled as it was trained (its serving.json's long_text).

`create_app` serves `models:/NAME@champion`. When the alias moves (a promotion or a rollback), noticed by
polling the registry or on `POST /reload`, the new version is downloaded and loaded in full first; then one
assignment swaps the (version, classifier) pair, so a request in flight finishes on the model it started
with. A version that fails to load is reported in /ready, /metadata and the log, and the previous one keeps
serving. With no champion yet the app still starts: /ready and /predict answer 503 and say why.

`tuneflow serve` (cli/serve.py) runs the app under uvicorn.
"""

import asyncio
import logging
import os
import threading
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Info, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from tuneflow.errors import TuneflowError
from tuneflow.onnx_runtime import OnnxClassifier
from tuneflow.registry import CHAMPION, Registry, Version, redact, scrub, temporary_dir
from tuneflow.scoring import softmax

log = logging.getLogger("tuneflow.serving")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METADATA_TAGS = ("method", "base_model", "data_hash", "onnx_sha256", "shipped_file")  # registry tags promote writes


@dataclass(frozen=True)
class Limits:
    """What one request may carry; beyond these it is refused with a 4xx that names the limit."""

    max_texts: int = 64
    max_chars: int = 10_000
    max_body_bytes: int = 4 * 1024 * 1024  # a full batch of maximum-length texts fits, even written as \\u escapes


# ---------------------------------------------------------------------------------------------------------------
# request and response bodies


def not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text is empty or only whitespace")
    return text


def predict_request_model(limits: Limits) -> type[BaseModel]:
    """The /predict body with this app's limits; pydantic refuses anything else (a lone surrogate too) with 422 and the reason."""
    Text = Annotated[str, StringConstraints(strict=True, max_length=limits.max_chars), AfterValidator(not_blank)]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[Text] = Field(min_length=1, max_length=limits.max_texts,
                                  description=f"1 to {limits.max_texts} texts, each 1 to {limits.max_chars} characters")

    return PredictRequest


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]  # softmax of the logits, one entry per label


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction]


# ---------------------------------------------------------------------------------------------------------------
# the model being served and how it is replaced


@dataclass(frozen=True)
class ServedModel:
    """One registry version, loaded and warmed up: a request reads this once and answers with it."""

    version: Version
    classifier: OnnxClassifier
    loaded_at: str

    def predict(self, texts: list[str]) -> list[Prediction]:
        labels = self.classifier.labels
        return [Prediction(label=labels[row.argmax()], probabilities=dict(zip(labels, row.tolist())))
                for row in softmax(self.classifier.logits(texts))]


class ServerMetrics:
    """The Prometheus metrics of one app, in a registry of its own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # request counts and latency: prometheus-fastapi-instrumentator, in create_app
        self.texts = Counter("tuneflow_predicted_texts", "Texts classified", registry=self.registry)
        self.reloads = Counter("tuneflow_model_reloads", "Loads of a new champion version by result",
                               ["result"], registry=self.registry)
        self.model = Info("tuneflow_model", "The registry version being served", registry=self.registry)


def one_line(error: BaseException) -> str:
    """An exception as one line for /ready, /metadata and the log, without credentials of any URL in it."""
    return scrub(" ".join(f"{type(error).__name__}: {error}".split()))[:500]


class Champion:
    """The version being served, and the way to the next one: load it fully, then swap it in with one assignment."""

    def __init__(self, registry: Registry, model_name: str, onnx_threads: int | None, metrics: ServerMetrics):
        self.registry, self.model_name, self.onnx_threads, self.metrics = registry, model_name, onnx_threads, metrics
        self.served: ServedModel | None = None
        self.last_error: str | None = None
        self._failed_version: str | None = None  # polling does not retry it; POST /reload does
        self._one_refresh_at_a_time = threading.Lock()

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}@{CHAMPION}"

    def refresh(self, retry_failed: bool = True) -> bool:
        """Serve the version the alias names now; True when that changed.

        A registry error or a version that does not load raises TuneflowError (also kept in `last_error`);
        whatever was served before keeps serving."""
        with self._one_refresh_at_a_time:
            try:
                changed = self._follow_alias(retry_failed)
            except TuneflowError as error:
                self.last_error = str(error)  # logged by whoever catches it; at start-up the CLI prints it once
                raise
            return changed

    def _follow_alias(self, retry_failed: bool) -> bool:
        target = self._lookup()
        if target is None:
            self._note(None if self.served is None else f"{self.uri} does not exist any more; still serving {self.describe()}")
            return False
        if self.served is not None and self.served.version.version == target.version:
            self._note(None)
            return False
        if target.version == self._failed_version and not retry_failed:
            return False  # its error stays reported
        try:
            loaded = self._load(target)
        except Exception as error:
            self._failed_version = target.version
            self.metrics.reloads.labels("failed").inc()
            raise TuneflowError(f"{self.model_name} v{target.version} (now {self.uri}) could not be loaded: {one_line(error)}; "
                                f"still serving {self.describe()}") from error
        previous = self.describe()
        self.served = loaded  # the swap: requests that already took the previous model finish on it
        self._failed_version = None
        self.metrics.reloads.labels("loaded").inc()
        self.metrics.model.info({"model": self.model_name, "version": target.version, "run_id": target.run_id or ""})
        log.info("serving %s v%s (%s) — was %s", self.model_name, target.version, self.uri, previous)
        self._note(None)
        return True

    def _lookup(self) -> Version | None:
        try:
            return self.registry.by_alias(self.model_name, CHAMPION)
        except TuneflowError:
            raise
        except Exception as error:  # an error the registry client let through (not an MlflowException): still one line
            raise TuneflowError(f"registry {redact(self.registry.uri)}: cannot look up {self.uri}: {one_line(error)}") from error

    def _load(self, version: Version) -> ServedModel:
        with temporary_dir() as scratch:  # ONNX Runtime and the tokenizer hold everything in memory once loaded
            model_dir = self.registry.download(version, Path(scratch))
            classifier = OnnxClassifier.from_mlflow_model(model_dir, threads=self.onnx_threads)
        # The first call sets the fast tokenizer's padding and truncation, a mutation that fails under concurrent
        # calls ("Already borrowed"); later calls with the same settings only read them. So: once, before any request.
        classifier.logits(["warm-up"])
        return ServedModel(version, classifier, datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def _note(self, problem: str | None) -> None:
        """A problem that raises nothing (or None: all is well again), logged once when it appears."""
        if problem is not None and problem != self.last_error:
            log.warning("%s", problem)
        self.last_error = problem

    def describe(self) -> str:
        return f"v{self.served.version.version}" if self.served is not None else "nothing"

    def not_ready_reason(self) -> str:
        if self.last_error:
            return self.last_error
        return (f"no model loaded: {self.uri} does not exist in {redact(self.registry.uri)}; promote a model, "
                f"then POST /reload (or wait for the next poll)")

    def status(self) -> dict[str, Any]:
        served = self.served
        return {"model": self.model_name, "version": served.version.version if served else None, "last_error": self.last_error}


# ---------------------------------------------------------------------------------------------------------------
# ASGI middleware: body size limit


class LimitBodySize:
    """Refuse a request body over `max_bytes` with 413: by its Content-Length, or as a chunked body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over {self.max_bytes} bytes, the server's limit"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
        received = 0

        async def receive_within_limit():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, detail=too_large)  # FastAPI passes it on from the body read
            return message

        await self.app(scope, receive_within_limit, send)


async def explain_invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 with one reason per problem, without echoing the input back (it may be a megabyte)."""
    reasons = []
    for problem in error.errors():
        detail = (problem.get("ctx") or {}).get("error")
        message = f"{problem['msg']}: {detail}" if isinstance(detail, str) else problem["msg"]
        reasons.append({"loc": list(problem["loc"]), "msg": message, "type": problem["type"]})
    return JSONResponse({"detail": reasons}, status_code=422)


async def follow_alias(champion: Champion, poll_seconds: float) -> None:
    logged = None
    while True:
        await asyncio.sleep(poll_seconds)
        try:
            await run_in_threadpool(champion.refresh, False)
        except TuneflowError as error:  # kept in champion.last_error; the served model stays
            if str(error) != logged:
                log.error("%s", error)
            logged = str(error)
        except Exception:  # a bug must not stop the polling for good
            log.exception("polling %s failed", champion.uri)
        else:
            logged = None


# ---------------------------------------------------------------------------------------------------------------
# the app


def create_app(model_name: str, registry: Registry | None = None, limits: Limits = Limits(), poll_seconds: float = 10.0,
               concurrency: int | None = None, onnx_threads: int | None = 1) -> FastAPI:
    """The server for `models:/model_name@champion`, with the champion loaded (if there is one) before it returns.

    `concurrency` bounds the inference calls running at once (default: one per CPU core), each on ONNX Runtime
    sessions of `onnx_threads` threads (None: ONNX Runtime's default); `poll_seconds` 0 turns polling off.
    An unreachable registry or a champion that does not load raises TuneflowError."""
    metrics = ServerMetrics()
    champion = Champion(registry or Registry(), model_name, onnx_threads, metrics)
    champion.refresh()
    if champion.served is None:
        log.warning("%s", champion.not_ready_reason())
    inference_slots = asyncio.Semaphore(concurrency or os.cpu_count() or 1)
    PredictRequest = predict_request_model(limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        poller = asyncio.create_task(follow_alias(champion, poll_seconds)) if poll_seconds > 0 else None
        yield
        if poller is not None:
            poller.cancel()

    app = FastAPI(title="tuneflow serve", description=f"Text classification by {champion.uri}", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, explain_invalid_request)

    @app.post("/predict", response_model=PredictResponse)
    async def predict(request: PredictRequest) -> PredictResponse:
        served = champion.served  # one read: the version and the classifier that answer belong together
        if served is None:
            raise HTTPException(503, detail=champion.not_ready_reason())
        async with inference_slots:  # waiting requests hold no thread; inference runs off the event loop
            predictions = await run_in_threadpool(served.predict, request.texts)
        metrics.texts.inc(len(predictions))
        return PredictResponse(model=model_name, version=served.version.version, predictions=predictions)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        body = {"ready": champion.served is not None, **champion.status()}
        if champion.served is None:
            return JSONResponse({**body, "reason": champion.not_ready_reason()}, status_code=503)
        return body

    @app.get("/metadata")
    async def metadata():
        served = champion.served
        if served is None:
            raise HTTPException(503, detail=champion.not_ready_reason())
        version = served.version
        return {
            "model": model_name,
            "alias": CHAMPION,
            "version": version.version,
            "run_id": version.run_id,
            **{key: version.tags.get(key) for key in METADATA_TAGS},
            "labels": served.classifier.labels,
            "max_length": served.classifier.max_length,
            "long_text": served.classifier.long_text.record(),  # the policy it was trained with; the served windows follow it
            "loaded_at": served.loaded_at,
            "last_error": champion.last_error,
            "limits": asdict(limits),
            "tags": version.tags,
        }

    @app.post("/reload")
    async def reload():
        try:
            changed = await run_in_threadpool(champion.refresh)
        except TuneflowError as error:
            log.error("POST /reload: %s", error)
            raise HTTPException(503, detail=str(error)) from error
        return {"changed": changed, **champion.status()}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # added last, so they wrap every route (the metrics middleware outermost: it also counts 413s);
    # tuneflow_http_requests_total{handler,method,status} and tuneflow_http_request_duration_seconds{handler,method}
    app.add_middleware(LimitBodySize, max_bytes=limits.max_body_bytes)
    Instrumentator(should_group_status_codes=False, registry=metrics.registry).instrument(
        app, metric_namespace="tuneflow", latency_lowr_buckets=LATENCY_BUCKETS)
    app.state.champion = champion
    return app
