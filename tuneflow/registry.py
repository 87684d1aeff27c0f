"""MLflow tracking and model registry: a local SQLite file by default, MLFLOW_TRACKING_URI overrides."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tuneflow.artifacts import RESOLVED_PARAMS

CHAMPION, CHALLENGER = "champion", "challenger"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def redact(uri: str) -> str:
    """The URI without user name and password (never written into an artifact)."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"***@{host}{f':{parts.port}' if parts.port else ''}"))


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]


class Registry:
    def __init__(self, uri: str | None = None):
        import mlflow

        self.uri = uri or tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri, self.uri)

    def by_alias(self, name: str, alias: str) -> Version | None:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None
        return Version(found.name, str(found.version), found.run_id, dict(found.tags))

    def download(self, version: Version, into: Path) -> Path:
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=str(into)))

    def experiment(self, name: str) -> str:
        import mlflow

        existing = mlflow.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        return mlflow.create_experiment(name)

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
    ) -> tuple[Version, str]:
        """One MLflow run with everything the pipeline produced; the ONNX model registered as a new version."""
        import mlflow
        import onnx

        with mlflow.start_run(experiment_id=self.experiment(model_name), tags=tags) as run:
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
                registered_model_name=model_name,
                extra_files=[str(path) for path in extra_files],
                save_as_external_data=False,
                metadata={key: tags[key] for key in ("data_hash", "method", "base_model") if key in tags},
            )
        version = str(info.registered_model_version)
        for key, value in tags.items():
            self.client.set_model_version_tag(model_name, version, key, value)
        return Version(model_name, version, run.info.run_id, tags), run.info.run_id

    def set_alias(self, version: Version, alias: str) -> None:
        self.client.set_registered_model_alias(version.name, alias, version.version)


def temporary_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="tuneflow-")
