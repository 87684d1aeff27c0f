"""`tuneflow serve` under load on loopback: ONNX Runtime fp32, fused fp32 and fused int8 against PyTorch eager.

One run of this script, in a scratch project: train the shipped job (BBC, LoRA; `--epochs`), export it twice with
`export.quantize=dynamic` — `export.optimize=none` (the dynamo graph) and `export.optimize=transformer` (the
TorchScript graph with ONNX Runtime's fusions) — then:

1. levers, in this process: batch-1 model time of each graph and session setting, one change per row, measured in
   alternating rounds on the same texts (1 thread unless the row says otherwise), and the tokenizer call alone;
2. served: register each file as the champion of its own model name and serve four servers one after the other —
   the same FastAPI app, the same limits, inference slots and threads; only the backend differs (dynamo fp32, fused
   fp32, fused int8, and the merged PyTorch model in eager mode swapped into the app's loader). A client on the same
   machine sends batch-1 requests (BBC test texts in turn) at concurrency 1, 8 and 32.

Prints both tables (latency P50/P95/P99, throughput, 5xx) plus test accuracy of each backend, and appends them to
benchmarks/RESULTS.md. Client and server share the cores: compare rows, not absolute figures.

    .venv/bin/python benchmarks/serving.py [--requests 600] [--epochs 1] [--lever-rounds 6] [--sample N]
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


def export_twice(folder: Path, env: dict[str, str], tuneflow: str) -> dict[str, Path]:
    """The export stage with each `export.optimize`, int8 kept whatever its agreement (the table reports it; the
    shipping rule's decision is recorded alongside); each export folder copied aside."""
    folders = {}
    for optimize in ("none", "transformer"):
        run(folder, env, tuneflow, "export", "--set", f"export.optimize={optimize}", "--set", "export.quantize=dynamic",
            "--set", "export.int8_min_argmax_agreement=0", "--set", "export.int8_max_accuracy_drop=1")
        folders[optimize] = folder / f"export-{optimize}"
        shutil.copytree(folder / "artifacts" / "export", folders[optimize])
    return folders


def lever_rows(exports: dict[str, Path], model_dir: Path, texts: list[str], rounds: int) -> tuple[list[tuple[str, list[float]]], dict]:
    """Batch-1 model time (ms) per lever, measured in alternating rounds on the same pre-tokenised texts."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from tuneflow.config import load_params
    from tuneflow.onnx_runtime import UNFUSED, OnnxClassifier
    from tuneflow.trained import load_trained

    classifier = OnnxClassifier.from_export(exports["none"])
    feeds = [classifier.encode([text]) for text in texts]

    def onnx(path: Path, threads: int = 1, disabled: list[str] = UNFUSED):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return lambda index: session.run(["logits"], feeds[index])

    model, _ = load_trained(model_dir, load_params(Path("params.yaml")).model)
    torch_feeds = [{name: torch.from_numpy(array) for name, array in feed.items()} for feed in feeds]

    def eager(index: int):
        with torch.inference_mode():
            return model(**torch_feeds[index]).logits

    plain, fused = exports["none"], exports["transformer"]
    # two phases, each in alternating rounds; torch's thread count is set once per phase (changing it per call costs)
    phases = {1: {
        "PyTorch eager fp32 (1 thread)": eager,
        "ONNX dynamo graph fp32, ONNX Runtime default session (before)": onnx(plain / "model.onnx", disabled=[]),
        "+ session without SkipLayerNormFusion (shipped session)": onnx(plain / "model.onnx"),
        "TorchScript graph + transformer optimizer fp32 (fused)": onnx(fused / "model.onnx"),
        "ONNX dynamo graph int8, default session (before)": onnx(plain / "model.int8.onnx", disabled=[]),
        "+ session without SkipLayerNormFusion": onnx(plain / "model.int8.onnx"),
        "fused graph int8 (QAttention)": onnx(fused / "model.int8.onnx"),
    }, 2: {
        "PyTorch eager fp32, 2 threads": eager,
        "fused graph int8, 2 intra-op threads": onnx(fused / "model.int8.onnx", threads=2),
    }}
    timings: dict[str, list[float]] = {}
    tokenizer_ms: list[float] = []
    for threads, levers in phases.items():
        torch.set_num_threads(threads)
        for call in levers.values():
            for index in range(5):
                call(index)  # warm-up, not measured
        for _ in range(rounds):
            for name, call in levers.items():
                for index in range(len(feeds)):
                    started = time.perf_counter()
                    call(index)
                    timings.setdefault(name, []).append((time.perf_counter() - started) * 1000)
            if threads == 1:
                for text in texts:
                    started = time.perf_counter()
                    classifier.encode([text])  # the served call: truncated to max_length, padded to its own length (none at batch 1)
                    tokenizer_ms.append((time.perf_counter() - started) * 1000)
    torch.set_num_threads(1)
    lengths = [feed["input_ids"].shape[1] for feed in feeds]
    return [*timings.items(), ("tokenizer call alone (fast tokenizer, per request)", tokenizer_ms)], \
        {"tokens_median": float(np.median(lengths)), "tokens_max": max(lengths), "texts": len(texts)}


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    quantile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": quantile(0.50), "p95": quantile(0.95), "p99": quantile(0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency level and backend")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lever-rounds", type=int, default=6, help="alternating rounds of the in-process lever table")
    parser.add_argument("--lever-texts", type=int, default=40, help="test texts per round and lever")
    parser.add_argument("--sample", type=int, help="data.sample, for a quick trial of the script")
    args = parser.parse_args()

    import pandas as pd
    import yaml

    from tuneflow.artifacts import read_json
    from tuneflow.onnx_runtime import OnnxClassifier
    from tuneflow.registry import CHAMPION, Registry

    folder = Path(tempfile.mkdtemp(prefix="tuneflow-serving-"))
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["sample"] = args.sample or params["data"]["sample"]
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "PYTHONPATH": str(REPO),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    tuneflow = str(BIN / "tuneflow")
    started_at = datetime.datetime.now(datetime.timezone.utc)
    try:
        run(folder, env, tuneflow, "ingest")
        run(folder, env, tuneflow, "validate")
        run(folder, env, tuneflow, "train", "--set", f"train.epochs={args.epochs}")
        exports = export_twice(folder, env, tuneflow)
        model_dir = folder / "artifacts" / "model"
        parity = {optimize: read_json(path / "parity.json") for optimize, path in exports.items()}
        test = pd.read_parquet(folder / "artifacts" / "validation" / "data" / "test.parquet")
        texts, truth = test["text"].tolist(), test["label"].tolist()
        os.chdir(folder)  # params.yaml of the scratch project, for the PyTorch model's loader
        levers, lever_inputs = lever_rows(exports, model_dir, texts[: args.lever_texts], args.lever_rounds)
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        registry = Registry()
        files = {"onnx-fp32 (dynamo graph)": exports["none"] / "model.onnx",
                 "onnx-fp32 fused": exports["transformer"] / "model.onnx",
                 "onnx-int8 fused": exports["transformer"] / "model.int8.onnx"}
        names = {backend: f"bench-{index}" for index, backend in enumerate(files)}
        for backend, path in files.items():
            version = registry.log_candidate(names[backend], path, sorted((path.parent / "assets").iterdir()), {}, {}, [], [], {}, {})
            registry.set_alias(names[backend], CHAMPION, version.version)
        accuracy = {backend: sum(p == t for p, t in zip(OnnxClassifier(path, path.parent / "assets").predict(texts), truth)) / len(texts)
                    for backend, path in files.items()}
        results = {backend: serve_and_measure(folder, env, "onnx", names[backend], model_dir, texts, args.requests) for backend in files}
        results["torch-eager"] = serve_and_measure(folder, env, "torch", names["onnx-fp32 (dynamo graph)"], model_dir, texts, args.requests)
    finally:
        os.chdir(REPO)
        shutil.rmtree(folder, ignore_errors=True)

    eager_lever = percentiles(levers[0][1])["p50"]
    lever_lines = []
    for name, values in levers:
        figures = percentiles(values)
        ratio = "" if name.startswith("tokenizer") else f"{eager_lever / figures['p50']:.2f}×"
        lever_lines.append(f"| {name} | {figures['p50']:.2f} | {figures['p95']:.2f} | {figures['p99']:.2f} | {ratio} |")
    rows = []
    for backend, by_concurrency in results.items():
        for concurrency, figures in by_concurrency.items():
            rows.append(f"| {backend} | {concurrency} | {figures['p50']:.1f} | {figures['p95']:.1f} | {figures['p99']:.1f} | "
                        f"{figures['p99'] / figures['p50']:.2f} | {figures['throughput']:.1f} | {figures['errors_5xx']} |")
    eager = results["torch-eager"][1]["p50"]
    ratios = {backend: eager / results[backend][1]["p50"] for backend in files}
    speed_met = [backend for backend, ratio in ratios.items() if ratio >= 3]
    tail = {backend: max(figures["p99"] / figures["p50"] for figures in by_concurrency.values()) for backend, by_concurrency in results.items()}
    optimization = parity["transformer"]["optimization"]
    int8 = parity["transformer"]["quantization"]
    int8_plain = parity["none"]["quantization"]
    ships = lambda q: q["argmax_agreement"] >= 0.99 and q["accuracy_drop"] <= 0.005  # noqa: E731  the shipped defaults' rule
    now = started_at.strftime("%Y-%m-%d %H:%M UTC")
    publish("\n".join([
        f"\n## Serving: `tuneflow serve` on loopback, ONNX fp32 / fused fp32 / fused int8 vs PyTorch eager — {now}\n",
        f"`python benchmarks/serving.py --requests {args.requests} --epochs {args.epochs} --lever-rounds {args.lever_rounds}"
        f"{f' --sample {args.sample}' if args.sample else ''}`; shipped params (BBC, LoRA, MiniLM-L6, max_length 128) but for "
        f"`export.quantize=dynamic` and each `export.optimize`; {len(texts)} test texts. 2 cores shared with other jobs "
        f"running at the same time, so compare rows of one table, not absolute figures.\n",
        f"Fused export (`export.optimize=transformer`): {optimization['reason']}; parity "
        f"{'passed' if parity['transformer']['passed'] else 'FAILED'} (ONNX vs merged max |Δlogit| "
        f"{parity['transformer']['max_abs_logit_diff']:.1e}, vs trained {parity['transformer']['comparisons']['onnx_vs_trained']['max_abs_logit_diff']:.1e}).\n",
        f"Levers, in one process: model time of one batch-1 call (ms) on {lever_inputs['texts']} test texts "
        f"(median {lever_inputs['tokens_median']:.0f} tokens, at most {lever_inputs['tokens_max']}), {args.lever_rounds} alternating rounds; "
        f"1 thread unless the row says otherwise; last column: PyTorch eager (1 thread) P50 over the row's.\n",
        "| lever | P50 | P95 | P99 | eager / this |", "|---|---|---|---|---|", *lever_lines, "",
        "Served: each server 2 inference slots × 1 ONNX Runtime (or torch) thread; the client (httpx, threads) on the same 2 cores. "
        "Latency is the client's, per request (ms).\n",
        "| backend | concurrency | P50 | P95 | P99 | P99/P50 | requests/s | 5xx |", "|---|---|---|---|---|---|---|---|", *rows, "",
        "Batch-1 P50 at concurrency 1, PyTorch eager over each: " + ", ".join(f"{backend} {ratio:.2f}×" for backend, ratio in ratios.items())
        + f". Target served P50 ≥ 3× faster than eager: {'met by ' + ', '.join(speed_met) if speed_met else 'NOT met'}. "
        "Largest P99/P50 over the three concurrency levels: " + ", ".join(f"{backend} {value:.2f}" for backend, value in tail.items())
        + f"; target P99 ≤ 2× P50: {'met' if all(value <= 2 for value in tail.values()) else 'NOT met for ' + ', '.join(b for b, v in tail.items() if v > 2)}.\n",
        "Accuracy (test): " + ", ".join(f"{backend} {value:.4f}" for backend, value in accuracy.items()) + ". "
        f"int8 vs fp32 on validation (export): fused argmax agreement {int8['argmax_agreement']:.4f}, accuracy drop {int8['accuracy_drop']:+.4f}, "
        f"largest logit error {int8['max_abs_logit_diff']:.3f} (the shipping rule ≥ 0.99 and ≤ 0.005: {'int8 would ship' if ships(int8) else 'fp32 would ship'}); "
        f"dynamo graph {int8_plain['argmax_agreement']:.4f}, {int8_plain['accuracy_drop']:+.4f} ({'int8 would ship' if ships(int8_plain) else 'fp32 would ship'}); "
        f"sizes fp32 {int8['size_bytes']['fp32'] / 1e6:.1f} MB, int8 {int8['size_bytes']['int8'] / 1e6:.1f} MB.\n",
    ]))


if __name__ == "__main__":
    main()
