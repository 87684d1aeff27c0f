"""The shipped artifact at run time: an ONNX Runtime session plus its tokenizer and label names.

An export bundle is `model.onnx` + an assets folder (tokenizer files and serving.json). The same
assets travel into the MLflow registry as the ONNX model's `extra_files`. serving.json records the long-text policy
the model was trained with (tuneflow/windows.py): the graph scores one window per row, and `logits` pools a text's
windows here (no policy recorded, as in exports made before it existed: truncate).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tuneflow import artifacts
from tuneflow.artifacts import read_json
from tuneflow.windows import INPUT_NAMES, LongText, Windower

__all__ = ["INPUT_NAMES", "OnnxClassifier", "UNFUSED"]
# Graph rewrites ONNX Runtime would apply at load time that make these models slower. SkipLayerNormFusion: its CPU
# kernel (1.31) takes ~320 µs on a 128 × 384 activation where the Add + LayerNormalization it replaces take ~40 µs,
# 3.8 ms of MiniLM's 13 ms int8 batch-1 run (benchmarks/serving.py measures the whole model both ways).
UNFUSED = ["SkipLayerNormFusion"]


class OnnxClassifier:
    def __init__(self, onnx_path: Path, assets_dir: Path, threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        serving = read_json(assets_dir / artifacts.SERVING)
        self.labels: list[str] = serving["labels"]
        self.max_length: int = serving["max_length"]
        self.long_text = LongText.from_record(serving.get("long_text"), self.max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(assets_dir)
        self.windower = Windower(self.tokenizer, self.long_text)
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
        """The graph's inputs for all windows of `texts` (one per text but under chunk), padded to the longest."""
        return self.windower.encode(texts)[0]

    def windows(self, texts: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """`encode`'s inputs and the index of the text each window row belongs to (for `pool`)."""
        return self.windower.encode(texts)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """The ids the model sees per text (its windows, concatenated): equal ids give equal logits."""
        windows, owner = self.windower.windows(texts)
        ids: list[list[int]] = [[] for _ in texts]
        for window, text in zip(windows, owner):
            ids[text].extend(window)
        return ids

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["logits"], inputs)[0]

    def logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Logits per text in the order of `texts`: `batch_size` windows per run, of similar length so little compute
        goes to padding, then each text's windows pooled (their mean)."""
        return self.windower.logits(self.run, texts, batch_size, len(self.labels))

    def predict(self, texts: list[str]) -> list[str]:
        return [self.labels[index] for index in self.logits(texts).argmax(axis=-1)]

    def latency_ms(self, texts: list[str], samples: int, warmup: int) -> np.ndarray:
        """Batch-1 request latency (tokenize + run), cycling through `texts`, after `warmup` requests."""
        for index in range(warmup):
            self.logits([texts[index % len(texts)]])
        timings = np.empty(samples)
        for index in range(samples):
            started = time.perf_counter()
            self.logits([texts[index % len(texts)]])
            timings[index] = (time.perf_counter() - started) * 1000
        return timings
