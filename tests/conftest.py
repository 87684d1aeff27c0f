"""Shared fixtures: a tiny BERT built from a config (no hub), small real data, isolated working dirs."""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MR_CSV = SHARED / "datasets" / "mr-polarity" / "mr.csv"
# The shared datasets sit beside the checkout (../shared); a clone made elsewhere skips the MR tests, saying why.
needs_mr = pytest.mark.skipif(not MR_CSV.exists(), reason=f"shared MR dataset not present at {MR_CSV}")
TUNEFLOW = Path(sys.executable).parent / "tuneflow"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the dvc commands tests run would otherwise start DVC's analytics daemon, which outlives the test
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Prefect's temporary server (`tuneflow run` without PREFECT_API_URL) may take longer than its 20 s default on a busy machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with seeded random weights and the MiniLM tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tuneflow.models import resolve_base
    from tuneflow.config import BUILTIN_MINILM

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(BUILTIN_MINILM))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)  # the same tiny model in every session: a test's outcome never depends on the draw
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty directory with its own MLflow store and Prefect home."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ".prefect"))
    return tmp_path


def topic_frame(rows_per_class: int = 30) -> pd.DataFrame:
    """Small separable 3-class data: each class has its own vocabulary."""
    vocab = {
        "sport": ["match", "goal", "team", "league", "coach", "score", "season", "striker"],
        "money": ["market", "shares", "profit", "bank", "investor", "stock", "price", "trade"],
        "music": ["album", "band", "song", "concert", "guitar", "singer", "chart", "tour"],
    }
    rows = []
    for label, words in vocab.items():
        for index in range(rows_per_class):
            # a seeded word order per row, so that no two rows are near-duplicates for the data gate
            picked = random.Random(f"{label}-{index}").sample(words, 6)
            rows.append({"text": f"{' '.join(picked)} number {index} for {label}", "label": label})
    return pd.DataFrame(rows)


def write_params(folder: Path, **sections) -> Path:
    """The repository's params.yaml with some keys of some sections replaced (DVC needs every section)."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for section, values in sections.items():
        params[section].update(values)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def gated_params(folder: Path, frame: pd.DataFrame, **sections) -> "Params":
    """Params over `frame` (written as CSV) with ingest and the data gate already run through the stage runner."""
    from pipeline.runner import run_stage
    from pipeline.table import STAGES
    from tuneflow.config import Params

    source = folder / "source.csv"
    frame.to_csv(source, index=False)
    params = Params.model_validate({"artifacts": str(folder / "artifacts"), **sections,
                                    "data": {"source": str(source), **sections.get("data", {})}})
    for stage in ("ingest", "validate"):
        run_stage(STAGES[stage], params)
    return params


def stage_inputs(stage_name: str, params) -> dict[str, Path]:
    """The input paths the stage table gives `stage_name`, for calling its entry function directly."""
    from pipeline.table import STAGES

    return {keyword: Path(params.artifacts) / relative for keyword, relative in STAGES[stage_name].inputs.items()}


def copy_repo_files(target: Path, *names: str) -> None:
    for name in names:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target / name)


def start_prefect_server(home: Path, services: bool = False):
    """`prefect server start` on a free loopback port; returns (process, env with PREFECT_API_URL). Services (the
    scheduler among them) are off unless asked for: a triggered run needs none of them."""
    import socket
    import subprocess
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(TUNEFLOW.parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                               "--no-ui", *([] if services else ["--no-services"])],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return server, {**env, "PREFECT_API_URL": url}
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("prefect server start failed")
            time.sleep(0.1)
    server.terminate()
    raise RuntimeError("prefect server did not answer within 60 s")


@pytest.fixture
def prefect_server(tmp_path):
    """One Prefect server for a test's runs (as deployments use one): `tuneflow run` skips its temporary server's start."""
    server, env = start_prefect_server(tmp_path / ".prefect")
    try:
        yield env
    finally:
        server.terminate()
        server.wait(30)
