"""`tuneflow serve` under load on loopback: ONNX Runtime fp32 and int8 against the same model served by PyTorch eager.

One run of this script, in a scratch project: train the shipped job (BBC, LoRA; `--epochs`), export it with
`export.quantize=dynamic` (model.onnx and model.int8.onnx), register each file as the champion of its own model
name, and serve three servers one after the other — the same FastAPI app, the same limits, inference slots and
threads; only the backend differs (fp32 ONNX, int8 ONNX, and the merged PyTorch model in eager mode swapped into
the app's loader). A client on the same machine sends batch-1 requests (BBC test texts in turn) at concurrency 1,
8 and 32. Prints a table (latency P50/P95/P99, throughput, 5xx) plus test accuracy of each backend, and appends it
to benchmarks/RESULTS.md. Client and server share the cores: compare rows, not absolute figures.

    .venv/bin/python benchmarks/serving.py [--requests 600] [--epochs 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import publish  # noqa: E402

BIN = Path(sys.executable).parent
CONCURRENCY = (1, 8, 32)
# The server process: the shipped app; for "torch" its loader returns the merged PyTorch model instead of ONNX.
SERVER = """
import sys, uvicorn
from tuneflow.serving import Champion, ServedModel, create_app
backend, name, port, model_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if backend == "torch":
    import numpy as np, torch
    from datetime import datetime, timezone
    from pathlib import Path
    from transformers import AutoTokenizer
    from tuneflow.config import load_params
    from tuneflow.trained import load_trained
    torch.set_num_threads(1)  # as --onnx-threads 1

    class Eager:
        def __init__(self):
            self.model, summary = load_trained(Path(model_dir), load_params("params.yaml").model)
            self.labels, self.max_length = summary["labels"], summary["max_length"]
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        def logits(self, texts):
            encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            with torch.inference_mode():
                return self.model(**encoded).logits.float().numpy()

    def load(self, version):
        classifier = Eager(); classifier.logits(["warm-up"])
        return ServedModel(version, classifier, datetime.now(timezone.utc).isoformat(timespec="seconds"))
    Champion._load = load
app = create_app(name, poll_seconds=0, concurrency=2, onnx_threads=1)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


def run(folder: Path, env: dict[str, str], *command: str) -> None:
    subprocess.run(command, cwd=folder, env=env, check=True, stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_test(port: int, texts: list[str], requests: int, concurrency: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                started = time.perf_counter()
                response = http.post("/predict", json={"texts": [texts[index % len(texts)]]})
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    latencies.append(elapsed)
                    statuses.append(response.status_code)

    started = time.perf_counter()
    workers = [threading.Thread(target=client) for _ in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    quantile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": quantile(0.50), "p95": quantile(0.95), "p99": quantile(0.99), "throughput": len(ordered) / wall,
            "errors_5xx": sum(status >= 500 for status in statuses), "non_200": sum(status != 200 for status in statuses)}


def serve_and_measure(folder: Path, env: dict[str, str], backend: str, name: str, model_dir: Path, texts: list[str],
                      requests: int) -> dict[int, dict[str, float]]:
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, backend, name, str(port), str(model_dir)], cwd=folder, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"{backend} server did not become ready")
            time.sleep(0.5)
        load_test(port, texts, 50, 1)  # warm-up, not measured
        return {concurrency: load_test(port, texts, requests, concurrency) for concurrency in CONCURRENCY}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency level and backend")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    import pandas as pd

    from tuneflow.artifacts import read_json
    from tuneflow.onnx_runtime import OnnxClassifier
    from tuneflow.registry import CHAMPION, Registry

    folder = Path(tempfile.mkdtemp(prefix="tuneflow-serving-"))
    shutil.copy(REPO / "params.yaml", folder / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "PYTHONPATH": str(REPO),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    tuneflow = str(BIN / "tuneflow")
    try:
        run(folder, env, tuneflow, "ingest")
        run(folder, env, tuneflow, "validate")
        run(folder, env, tuneflow, "train", "--set", f"train.epochs={args.epochs}")
        # int8 kept whatever its agreement (the table reports it): the defaults' decision is recorded alongside
        run(folder, env, tuneflow, "export", "--set", "export.quantize=dynamic", "--set", "export.int8_min_argmax_agreement=0",
            "--set", "export.int8_max_accuracy_drop=1")
        export, model_dir = folder / "artifacts" / "export", folder / "artifacts" / "model"
        parity = read_json(export / "parity.json")
        test = pd.read_parquet(folder / "artifacts" / "validation" / "data" / "test.parquet")
        texts, truth = test["text"].tolist(), test["label"].tolist()
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        registry = Registry()
        files = {"onnx-fp32": "model.onnx", "onnx-int8": "model.int8.onnx"}
        for name, file in files.items():
            version = registry.log_candidate(name, export / file, sorted((export / "assets").iterdir()), {}, {}, [], [], {}, {})
            registry.set_alias(name, CHAMPION, version.version)
        accuracy = {name: sum(p == t for p, t in zip(OnnxClassifier(export / file, export / "assets").predict(texts), truth)) / len(texts)
                    for name, file in files.items()}
        results = {name: serve_and_measure(folder, env, "onnx", name, model_dir, texts, args.requests) for name in files}
        results["torch-eager"] = serve_and_measure(folder, env, "torch", "onnx-fp32", model_dir, texts, args.requests)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    rows = []
    for backend, by_concurrency in results.items():
        for concurrency, figures in by_concurrency.items():
            rows.append(f"| {backend} | {concurrency} | {figures['p50']:.1f} | {figures['p95']:.1f} | {figures['p99']:.1f} | "
                        f"{figures['p99'] / figures['p50']:.2f} | {figures['throughput']:.1f} | {figures['errors_5xx']} |")
    eager = results["torch-eager"][1]["p50"]
    ratios = ", ".join(f"{name} {eager / results[name][1]['p50']:.2f}×" for name in files)
    quantization = parity.get("quantization", {})
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    publish("\n".join([
        f"\n## Serving: `tuneflow serve` on loopback, ONNX fp32 / int8 vs PyTorch eager — {now}\n",
        f"`python benchmarks/serving.py --requests {args.requests} --epochs {args.epochs}`; shipped params (BBC, LoRA, MiniLM, "
        f"{len(texts)} test texts, batch 1 per request, texts in turn); each server: 2 inference slots × 1 thread; the client "
        f"(httpx, threads) on the same 2 cores. Latency is the client's, per request (ms).\n",
        "| backend | concurrency | P50 | P95 | P99 | P99/P50 | requests/s | 5xx |", "|---|---|---|---|---|---|---|---|", *rows, "",
        f"Batch-1 P50 at concurrency 1, PyTorch eager over each: {ratios} (target ≥ 3×). "
        f"Test accuracy: fp32 {accuracy['onnx-fp32']:.4f}, int8 {accuracy['onnx-int8']:.4f}. "
        f"int8 vs fp32 on validation (export): argmax agreement {quantization.get('argmax_agreement', float('nan')):.4f}, accuracy drop "
        f"{quantization.get('accuracy_drop', float('nan')):+.4f} (the shipped defaults ship int8 at ≥ 0.99 and ≤ 0.005); "
        f"sizes fp32 {(quantization.get('size_bytes') or {}).get('fp32', 0) / 1e6:.1f} MB, int8 {(quantization.get('size_bytes') or {}).get('int8', 0) / 1e6:.1f} MB.\n",
    ]))


if __name__ == "__main__":
    main()
