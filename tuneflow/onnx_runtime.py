"""The shipped artifact at run time: an ONNX Runtime session plus its tokenizer and label names.

An export bundle is `model.onnx` + an assets folder (tokenizer files and serving.json). The same
assets travel into the MLflow registry as the ONNX model's `extra_files`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tuneflow import artifacts
from tuneflow.artifacts import read_json

INPUT_NAMES = ["input_ids", "attention_mask"]
# Graph rewrites ONNX Runtime would apply at load time that make these models slower. SkipLayerNormFusion: its CPU
# kernel (1.31) takes ~320 µs on a 128 × 384 activation where the Add + LayerNormalization it replaces take ~40 µs,
# 3.8 ms of MiniLM's 13 ms int8 batch-1 run (benchmarks/serving.py measures the whole model both ways).
UNFUSED = ["SkipLayerNormFusion"]


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """The model inputs for a batch of texts, as served: truncated to `max_length`, padded to the batch's longest."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in INPUT_NAMES}


class OnnxClassifier:
    def __init__(self, onnx_path: Path, assets_dir: Path, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        serving = read_json(assets_dir / artifacts.SERVING)
        self.labels: list[str] = serving["labels"]
        self.max_length: int = serving["max_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(assets_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=UNFUSED)

    @classmethod
    def from_export(cls, export_dir: Path, threads: int | None = None) -> "OnnxClassifier":
        return cls(export_dir / artifacts.ONNX_MODEL, export_dir / artifacts.ASSETS, threads)

    @classmethod
    def from_mlflow_model(cls, model_dir: Path, threads: int | None = None) -> "OnnxClassifier":
        return cls(model_dir / artifacts.ONNX_MODEL, model_dir / "extra_files", threads)  # MLflow's folder name

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        return encode(self.tokenizer, texts, self.max_length)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """The model's input ids per text (truncated as in `encode`): equal ids give equal logits."""
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Logits in the order of `texts`; batches are formed by text length, so little compute goes to padding."""
        order = np.argsort([len(text) for text in texts], kind="stable")
        outputs = [self.session.run(["logits"], self.encode([texts[i] for i in order[start : start + batch_size]]))[0]
                   for start in range(0, len(texts), batch_size)]
        if not outputs:
            return np.empty((0, len(self.labels)), dtype=np.float32)
        logits = np.empty_like(np.concatenate(outputs, axis=0))
        logits[order] = np.concatenate(outputs, axis=0)
        return logits

    def predict(self, texts: list[str]) -> list[str]:
        return [self.labels[index] for index in self.logits(texts).argmax(axis=-1)]

    def latency_ms(self, texts: list[str], samples: int, warmup: int) -> np.ndarray:
        """Batch-1 request latency (tokenize + run), cycling through `texts`, after `warmup` requests."""
        for index in range(warmup):
            self.session.run(["logits"], self.encode([texts[index % len(texts)]]))
        timings = np.empty(samples)
        for index in range(samples):
            started = time.perf_counter()
            self.session.run(["logits"], self.encode([texts[index % len(texts)]]))
            timings[index] = (time.perf_counter() - started) * 1000
        return timings
