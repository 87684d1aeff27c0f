"""Latency and cost of a model as a server would see it, each measured in a fresh process.

A fresh interpreter per model (`python -m tuneflow.latency REQUEST`) makes the cold start real and the peak
RSS the model's own, not the evaluation's. Every request is batch 1 and includes tokenisation (MLPerf's single-stream scenario);
throughput is measured at a fixed batch size. The PyTorch model is measured the same way as the reference. A request
is what serving runs: every window of its texts under the model's long-text policy (tuneflow/windows.py), then pooling.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneflow.config import ModelConfig
from tuneflow.scoring import quartile_groups
from tuneflow.windows import pool


@dataclass(frozen=True)
class Plan:
    samples: int
    warmup: int
    batch_size: int
    throughput_texts: int
    threads: int | None


@dataclass(frozen=True)
class OnnxTarget:
    onnx_path: Path
    assets_dir: Path

    def import_libraries(self) -> None:
        import onnxruntime  # noqa: F401
        import transformers  # noqa: F401

    def load(self, threads: int | None):
        from tuneflow.onnx_runtime import OnnxClassifier

        model = OnnxClassifier(self.onnx_path, self.assets_dir, threads)

        def run(encoded):
            inputs, owner = encoded
            return pool(model.run(inputs), owner, int(owner.max()) + 1)

        return model.windows, run, self.onnx_path.stat().st_size


@dataclass(frozen=True)
class TorchTarget:
    model_dir: Path
    model_cfg: ModelConfig

    def import_libraries(self) -> None:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

    def load(self, threads: int | None):
        import torch
        from transformers import AutoTokenizer

        from tuneflow.trained import load_trained, summary_long_text
        from tuneflow.windows import Windower

        if threads:
            torch.set_num_threads(threads)
        model, summary = load_trained(self.model_dir, self.model_cfg)
        windower = Windower(AutoTokenizer.from_pretrained(self.model_dir), summary_long_text(summary))

        def run(encoded):
            inputs, owner = encoded
            with torch.inference_mode():
                logits = model(input_ids=torch.from_numpy(inputs["input_ids"]),
                               attention_mask=torch.from_numpy(inputs["attention_mask"])).logits.numpy()
            return pool(logits, owner, int(owner.max()) + 1)

        encode = windower.encode

        # the merged model's parameters and buffers: what a PyTorch server would hold and ship
        size = sum(tensor.numel() * tensor.element_size() for tensor in [*model.parameters(), *model.buffers()])
        return encode, run, size


def profile(target: OnnxTarget | TorchTarget, texts: list[str], plan: Plan) -> dict[str, Any]:
    """Measure `target` in a fresh process (see the module docstring)."""
    if isinstance(target, OnnxTarget):
        spec = {"kind": "onnx", "onnx_path": str(target.onnx_path), "assets_dir": str(target.assets_dir)}
    else:
        spec = {"kind": "pytorch", "model_dir": str(target.model_dir), "model_cfg": target.model_cfg.model_dump(mode="json")}
    with tempfile.TemporaryDirectory(prefix="tuneflow-latency-") as scratch:
        request, result = Path(scratch) / "request", Path(scratch) / "result"  # scratch files, JSON
        request.write_text(json.dumps({"target": spec, "texts": texts, "plan": asdict(plan), "result": str(result)}), encoding="utf-8")
        finished = subprocess.run([sys.executable, "-m", "tuneflow.latency", str(request)], capture_output=True, text=True)
        if finished.returncode != 0:
            last = (finished.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"latency measurement of {spec['kind']} failed: {last}")
        return json.loads(result.read_text(encoding="utf-8"))


def main(request_path: str) -> None:
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    spec = request["target"]
    target = (OnnxTarget(Path(spec["onnx_path"]), Path(spec["assets_dir"])) if spec["kind"] == "onnx"
              else TorchTarget(Path(spec["model_dir"]), ModelConfig.model_validate(spec["model_cfg"])))
    measured = _profile_here(target, request["texts"], Plan(**request["plan"]))
    Path(request["result"]).write_text(json.dumps(measured), encoding="utf-8")


def _profile_here(target: OnnxTarget | TorchTarget, texts: list[str], plan: Plan) -> dict[str, Any]:
    imported = time.perf_counter()
    target.import_libraries()
    rss_before_mb = _peak_rss_mb()
    started = time.perf_counter()
    encode, run, size_bytes = target.load(plan.threads)
    loaded = time.perf_counter()
    run(encode(texts[:1]))
    first = time.perf_counter()
    for index in range(plan.warmup):
        run(encode([texts[index % len(texts)]]))
    timings, tokens = np.empty(plan.samples), np.empty(plan.samples, dtype=int)
    for index in range(plan.samples):
        request = time.perf_counter()
        inputs = encode([texts[index % len(texts)]])
        run(inputs)
        timings[index] = (time.perf_counter() - request) * 1000
        tokens[index] = int(inputs[0]["attention_mask"].sum())  # of all the request's windows
    batch_texts = [texts[index % len(texts)] for index in range(plan.throughput_texts)]
    batched = time.perf_counter()
    for start in range(0, len(batch_texts), plan.batch_size):
        run(encode(batch_texts[start : start + plan.batch_size]))
    throughput = len(batch_texts) / (time.perf_counter() - batched)
    return {
        "cold_start_ms": {"imports": (started - imported) * 1000, "load": (loaded - started) * 1000, "first_request": (first - loaded) * 1000,
                          "total": (first - started) * 1000},
        **summarise(timings),
        "by_token_length": by_token_length(timings, tokens),
        "throughput_per_s": throughput,
        "throughput_batch_size": plan.batch_size,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_load_mb": rss_before_mb,
        "size_bytes": size_bytes,
        "timings_ms": timings.round(4).tolist(),
        "includes": "tokenisation + model, batch 1, a fresh process (cold start excludes library imports)",
    }


def summarise(timings: np.ndarray) -> dict[str, float]:
    return {"p50": float(np.percentile(timings, 50)), "p95": float(np.percentile(timings, 95)),
            "p99": float(np.percentile(timings, 99)), "mean": float(timings.mean()), "samples": int(len(timings))}


def by_token_length(timings: np.ndarray, tokens: np.ndarray) -> list[dict[str, Any]]:
    """Batch-1 latency per token-length quartile of the timed requests."""
    return [{"tokens": bucket, "requests": int(members.sum()), "p50": float(np.percentile(timings[members], 50)),
             "p95": float(np.percentile(timings[members], 95))} for bucket, members in quartile_groups(tokens, "tokens").items()]


def _peak_rss_mb() -> float:
    """This process's peak resident set. Linux: VmHWM, which starts afresh at exec (ru_maxrss would count the
    parent's pages the spawned child held between fork and exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main(sys.argv[1])
