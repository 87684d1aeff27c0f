"""MLflow tracking and model registry: a local SQLite file by default, MLFLOW_TRACKING_URI overrides (a server too).

Every alias move goes through `move_alias`, which appends an entry to the model's history. The history lives in
the registry itself, one registered-model tag per entry (`tuneflow.history.000001`, ...), so it survives with the
registry and is shared by everyone who uses it. Writers hold `lock(name)`: a registered model named
`<name>.tuneflow-lock` whose creation is atomic in every MLflow backend (unique names), so two promotions of the
same model — two processes, two machines — take turns. Any registry failure is a `RegistryError`: one line.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from tuneflow.artifacts import RESOLVED_PARAMS
from tuneflow.errors import InputError, TuneflowError

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "tuneflow.history."
LOCK_SUFFIX = ".tuneflow-lock"
PROMOTION_TAG = "promotion"  # on a version: pending while a promotion runs, then done or failed: <reason>
LOCK_WAIT_S, LOCK_STALE_S = 120.0, 600.0


class RegistryError(TuneflowError):
    """The registry could not be read or written (unreachable, permissions, a failed write). Exit code 1."""

    transient = True  # unreachable or locked now is the usual cause; a retry of a permission error costs only time


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def redact(uri: str) -> str:
    """The URI without user name, password, query or fragment (never written into an artifact)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None and not parts.query and not parts.fragment:
        return uri  # untouched: urlunsplit would also drop the empty host of sqlite:////path
    host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    netloc = f"***@{host}" if parts.username is not None or parts.password is not None else parts.netloc
    return urlunsplit(parts._replace(netloc=netloc, query="", fragment=""))


def run_link(uri: str, run_id: str | None) -> str:
    """Where to see a run: a UI link on a tracking server, else the (redacted) store and the run id."""
    uri = redact(uri)
    if not run_id:
        return "no run (nothing registered)"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/runs/{run_id}"
    return f"run {run_id} in {uri} (`mlflow ui --backend-store-uri {uri}`)"


def scrub(text: str) -> str:
    """Text (an error message) with the credentials of any URL in it replaced."""
    return re.sub(r"(?<=//)[^/@\s]+@", "***@", text)


def safe_key(prefix: str, label: str) -> str:
    """An MLflow metric or tag name for a label: ASCII letters, digits, `_.-`; a changed label gets a short hash."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:64]
    if cleaned != label:
        cleaned += "-" + hashlib.sha256(label.encode()).hexdigest()[:8]  # `a&b` and `a|b` stay apart
    return prefix + cleaned


def actor() -> str:
    """Who moved an alias: TUNEFLOW_ACTOR, else the login name, at this host."""
    try:
        user = os.environ.get("TUNEFLOW_ACTOR") or getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def history_entry(alias: str, from_version: str | None, to_version: str | None, *, action: str, reason: str,
                  run_id: str | None = None, forced: bool = False) -> dict[str, Any]:
    """One history record. action: promote, revert (a failed promotion undone), rollback, force, refused (nothing moved)."""
    return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "alias": alias,
            "from_version": from_version, "to_version": to_version, "action": action, "forced": forced,
            "reason": reason, "run_id": run_id, "who": actor()}


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]


def _version(found: Any) -> Version:
    return Version(found.name, str(found.version), found.run_id, dict(found.tags))


def _not_found(error: Exception) -> bool:
    """Only "this model / alias does not exist" means absent; anything else is an error."""
    code = getattr(error, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(error))


class Registry:
    def __init__(self, uri: str | None = None):
        import mlflow

        self.uri = uri or tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri, self.uri)

    def failure(self, what: str, error: BaseException) -> RegistryError:
        first = scrub((str(error).strip().splitlines() or [type(error).__name__])[0])[:300]
        return RegistryError(f"registry {redact(self.uri)}: {what} failed: {first}")

    @contextlib.contextmanager
    def calling(self, what: str) -> Iterator[None]:
        """Registry errors as one line naming the registry (redacted) and the operation."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except RegistryError:
            raise
        except (MlflowException, OSError) as error:
            raise self.failure(what, error) from error

    # reading
    def by_alias(self, name: str, alias: str) -> Version | None:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as error:
            if _not_found(error):
                return None
            raise self.failure(f"reading {name}@{alias}", error) from error  # unreachable, permissions: not "no champion"
        return _version(found)

    def get(self, name: str, version: str) -> Version:
        from mlflow.exceptions import MlflowException

        try:
            return _version(self.client.get_model_version(name, version))
        except MlflowException as error:
            if _not_found(error):
                raise InputError(f"{name} v{version}: no such model version in the registry") from error
            raise self.failure(f"reading {name} v{version}", error) from error

    def versions(self, name: str) -> list[Version]:
        with self.calling(f"listing versions of {name}"):
            found = self.client.search_model_versions(f"name='{name}'")
        return sorted((_version(item) for item in found), key=lambda version: int(version.version))

    def registered(self, name: str) -> Any:
        """The registered model (aliases, tags), or None when it does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as error:
            if _not_found(error):
                return None
            raise self.failure(f"reading {name}", error) from error

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version ({} when the model does not exist)."""
        model = self.registered(name)
        return {alias: str(version) for alias, version in model.aliases.items()} if model else {}

    def models(self) -> list[str]:
        with self.calling("listing registered models"):
            found = self.client.search_registered_models()
        return sorted(model.name for model in found if not model.name.endswith(LOCK_SUFFIX))

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every alias move of a registered model, oldest first."""
        model = self.registered(name)
        tags = model.tags if model else {}
        return [json.loads(tags[key]) for key in sorted(key for key in tags if key.startswith(HISTORY_TAG))]

    def find_version(self, name: str, identity: dict[str, str]) -> Version | None:
        """The version registered for this exact artifact (same tags for every key of `identity`), if any."""
        return next((version for version in self.versions(name)
                     if all(version.tags.get(key) == value for key, value in identity.items())), None)

    def download(self, version: Version, into: Path) -> Path:
        import mlflow

        with self.calling(f"downloading {version.name} v{version.version}"):
            return Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=str(into)))

    def resolved_params(self, version: Version) -> dict[str, Any]:
        """The params the version was trained with, as its run logged them (resolved_params.yaml)."""
        import mlflow
        import yaml

        if not version.run_id:
            raise InputError(f"{version.name} v{version.version}: registered without a run; its params are unknown")
        with self.calling(f"reading the params of {version.name} v{version.version}"):
            return yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{version.run_id}/{RESOLVED_PARAMS}"))

    def experiment(self, name: str) -> str:
        import mlflow

        existing = mlflow.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        return mlflow.create_experiment(name)

    # writing
    def log_candidate(
        self,
        model_name: str,
        onnx_path: Path,
        extra_files: list[Path],
        params: dict[str, Any],
        metrics: dict[str, float],
        step_metrics: list[tuple[str, float, int]],
        artifacts: list[Path],
        resolved_params: dict[str, Any],
        tags: dict[str, str],
    ) -> Version:
        """One MLflow run with everything the pipeline produced; the ONNX model registered as a new version."""
        import mlflow
        import onnx
        import onnxruntime

        with self.calling(f"registering a version of {model_name}"), \
                mlflow.start_run(experiment_id=self.experiment(model_name), tags=tags) as run:
            mlflow.log_params(params)
            mlflow.log_metrics(metrics)
            for key, value, step in step_metrics:
                mlflow.log_metric(key, value, step=step)
            for artifact in artifacts:
                if artifact.is_dir():
                    mlflow.log_artifacts(str(artifact), artifact_path=artifact.name)
                elif artifact.exists():
                    mlflow.log_artifact(str(artifact), artifact_path=artifact.parent.name)
            mlflow.log_dict(resolved_params, RESOLVED_PARAMS)
            info = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)),
                name="model",
                extra_files=[str(path) for path in extra_files],
                save_as_external_data=False,
                # named, not inferred: inference runs a pip subprocess (about 2 s) for a known answer
                pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
                metadata={key: tags[key] for key in ("data_hash", "method", "base_model") if key in tags},
            )
            # the version and its tags in one registry write: a kill never leaves a version without its identity
            # (find_version) and its promotion tag
            registered = mlflow.register_model(info.model_uri, model_name, tags=tags)
        return Version(model_name, str(registered.version), run.info.run_id, tags)

    def tag_version(self, version: Version, tags: dict[str, str]) -> None:
        with self.calling(f"tagging {version.name} v{version.version}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(version.name, version.version, key, value)

    def set_alias(self, name: str, alias: str, version: str | None) -> None:
        """Point `alias` at `version` (None: remove the alias)."""
        with self.calling(f"moving {name}@{alias}"):
            if version is None:
                self.client.delete_registered_model_alias(name, alias)
            else:
                self.client.set_registered_model_alias(name, alias, version)

    def append_history(self, name: str, entry: dict[str, Any]) -> str:
        """Add one entry after the last (call under `lock(name)`); returns its tag key."""
        with self.calling(f"writing the history of {name}"):
            key = f"{HISTORY_TAG}{len(self.history(name)) + 1:06d}"
            self.client.set_registered_model_tag(name, key, json.dumps(entry, sort_keys=True))
        return key

    def move_alias(self, name: str, alias: str, version: str | None, *, reason: str, run_id: str | None = None,
                   forced: bool = False, action: str = "promote") -> dict[str, Any]:
        """Move an alias and record the move in the history, together: if the history write fails, the alias goes back.

        Call under `lock(name)`."""
        before = self.aliases(name).get(alias)
        entry = history_entry(alias, before, version, action=action, reason=reason, run_id=run_id, forced=forced)
        self.set_alias(name, alias, version)
        try:
            self.append_history(name, entry)
        except RegistryError:
            with contextlib.suppress(RegistryError):
                self.set_alias(name, alias, before)
            raise
        return entry

    @contextlib.contextmanager
    def lock(self, name: str, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S) -> Iterator[None]:
        """Exclusive right to move `name`'s aliases: one writer at a time, across processes and machines."""
        from mlflow.exceptions import MlflowException

        lock_name = name + LOCK_SUFFIX
        holder = {"holder": f"{actor()} pid {os.getpid()}", "host": _process_host(), "pid": str(os.getpid())}
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.client.create_registered_model(lock_name, tags={**holder, "since": str(time.time())},
                                                    description=f"held by tuneflow while it moves {name}'s aliases")
                break
            except MlflowException as error:
                if getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                    raise self.failure(f"locking {name}", error) from error
            held = self._lock_holder(lock_name)
            # a holder that died (killed, crashed) never releases: break its lock at once if it is known dead, else when stale
            if held is not None and (held[2] or time.time() - held[1] > stale_s):
                with contextlib.suppress(MlflowException):
                    self.client.delete_registered_model(lock_name)
                continue
            if time.monotonic() > deadline:
                raise RegistryError(f"registry {redact(self.uri)}: {name} is locked by another promotion "
                                    f"({held[0] if held else 'unknown holder'}); retry, or delete the registered model {lock_name}")
            time.sleep(0.2)
        try:
            yield
        finally:
            with contextlib.suppress(MlflowException):
                self.client.delete_registered_model(lock_name)

    def _lock_holder(self, lock_name: str) -> tuple[str, float, bool] | None:
        """Who holds the lock, since when, and whether that process is known to be dead: it ran on this host (and
        PID namespace) and its pid is gone. A holder elsewhere can only go stale."""
        lock = self.registered(lock_name)
        if lock is None:
            return None
        tags = lock.tags
        pid = tags.get("pid", "")
        dead = tags.get("host") == _process_host() and pid.isdigit() and int(pid) > 0 and not _pid_alive(int(pid))
        return tags.get("holder", "unknown holder"), float(tags.get("since", "0") or 0), dead


def _process_host() -> str:
    """This host, with its PID namespace where Linux tells it: containers that share a hostname have separate pids."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()} {namespace}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def champion_stack(history: list[dict[str, Any]]) -> list[str]:
    """The champions in order, as promotions push them and rollbacks pop them: the last is the live one."""
    stack: list[str] = []
    for entry in history:
        if entry["alias"] != CHAMPION or entry["action"] == "refused":
            continue
        target = entry["to_version"]
        if entry["action"] in ("rollback", "revert") and (target in stack or target is None):
            while stack and stack[-1] != target:
                stack.pop()
        elif target is not None and (not stack or stack[-1] != target):
            stack.append(target)
    return stack


def rollback(registry: Registry, name: str, reason: str, to: str | None = None) -> dict[str, Any]:
    """Move @champion back to the previous champion (or to `to`, which must have been champion before)."""
    rollback_target(registry, name, to)  # refuse before the lock: taking it is already a registry write
    with registry.lock(name):
        target = rollback_target(registry, name, to)
        return registry.move_alias(name, CHAMPION, target.version, reason=reason, run_id=target.run_id, action="rollback")


def rollback_target(registry: Registry, name: str, to: str | None) -> Version:
    current = registry.by_alias(name, CHAMPION)
    if current is None:
        raise InputError(f"{name}: no @champion to roll back")
    history = registry.history(name)
    stack = champion_stack(history)
    if not stack or stack[-1] != current.version:
        raise InputError(f"{name}: @champion is v{current.version} but its history ends at "
                         f"{f'v{stack[-1]}' if stack else 'nothing'} (moved outside tuneflow?); name the target with --to")
    if to is None:
        if len(stack) < 2:
            raise InputError(f"{name}: v{current.version} is the first champion; there is nothing to roll back to")
        to = stack[-2]
    elif to == current.version:
        raise InputError(f"{name}: v{to} already is @champion")
    elif to not in {entry["to_version"] for entry in history if entry["alias"] == CHAMPION}:
        raise InputError(f"{name}: v{to} was never @champion; use `tuneflow registry promote {name} {to} --force --reason ...`")
    return registry.get(name, to)


def force_promote(registry: Registry, name: str, version: str, reason: str) -> dict[str, Any]:
    """Move @champion to `version` whatever its verdict said, recorded as forced with the reason given."""
    force_target(registry, name, version)  # refuse before the lock, as rollback does
    with registry.lock(name):
        target = force_target(registry, name, version)
        return registry.move_alias(name, CHAMPION, target.version, reason=reason, run_id=target.run_id,
                                   forced=True, action="force")


def force_target(registry: Registry, name: str, version: str) -> Version:
    target = registry.get(name, version)
    current = registry.by_alias(name, CHAMPION)
    if current is not None and current.version == target.version:
        raise InputError(f"{name}: v{version} already is @champion")
    return target


def temporary_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="tuneflow-")
