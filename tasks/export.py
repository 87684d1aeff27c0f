"""Stage 4 — export: fold the trained weights into a plain model, export ONNX, prove parity, maybe int8.

The graph is the dynamo exporter's; with `export.optimize: transformer` it is the TorchScript exporter's with ONNX
Runtime's transformer fusions instead, when they cover every layer and the fused graph passes parity with the merged
model (otherwise the dynamo graph ships and parity.json's `optimization` says why).

Parity is measured on the validation texts against the trained model's own logits (saved by train), so a merge
that lost the head or drifted in de-quantisation fails: the merged PyTorch model and the ONNX model are each
compared with them, and the ONNX model with the merged one. With `export.quantize: dynamic` an int8 model is
written too and ships only if it agrees with the fp32 one on validation; otherwise fp32 ships, saying why.

Writes into its output folder (artifacts/export/) model.onnx (+ model.int8.onnx), assets/ (tokenizer, serving.json),
parity.json and report.md. A parity failure is raised once they are published, so the run stops before evaluation
and promotion with the evidence kept; evaluate refuses an export whose parity failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from tuneflow import artifacts
from tuneflow.artifacts import content_hash, read_json, write_json
from tuneflow.config import ExportConfig, ModelConfig
from tuneflow.data import read_splits
from tuneflow.errors import InputError, StageFailed
from tuneflow.onnx_runtime import INPUT_NAMES, OnnxClassifier
from tuneflow.trained import LogitsOnly, load_trained, predict_logits, read_logits, summary_long_text, texts_hash

WORST_EXAMPLES = 5  # rows listed per failed comparison
EXAMPLE_CHARS = 200


@dataclass(frozen=True)
class ExportResult:
    export_dir: Path
    parity: dict[str, Any]

    def failure(self, published: Path) -> StageFailed | None:
        """Raised by the stage runner once the export and its parity record are published in `published`."""
        if self.parity["passed"]:
            return None
        return StageFailed(f"{published / artifacts.PARITY}: parity failed: {failure_summary(self.parity)}")


@dataclass(frozen=True)
class Tolerance:
    max_abs_logit_diff: float
    min_argmax_agreement: float


def export(model_dir: Path, data_dir: Path, model_cfg: ModelConfig, cfg: ExportConfig, out_dir: Path) -> ExportResult:
    validation = read_splits(data_dir)["validation"]
    texts = validation["text"].tolist()
    trained = trained_validation_logits(model_dir, texts)
    # merged weights where the method can merge; otherwise base + trained add-on, exported as one graph
    merged, summary = load_trained(model_dir, model_cfg)
    labels = summary["labels"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    assets = out_dir / artifacts.ASSETS
    tokenizer.save_pretrained(assets)
    long_text = summary_long_text(summary)  # the policy it was trained with travels to serving; the graph is per window
    write_json(assets / artifacts.SERVING, {"labels": labels, "max_length": summary["max_length"],
                                            "long_text": long_text.record(),
                                            "inputs": INPUT_NAMES, "output": "logits", "method": summary["method"],
                                            "method_export": summary["export"]})

    merged_logits = predict_logits(merged, tokenizer, texts, long_text, cfg.parity_batch_size)
    graph = LogitsOnly(merged).eval()
    onnx_path = out_dir / artifacts.ONNX_MODEL
    optimization = fuse_transformer(graph, tokenizer, cfg, onnx_path) if cfg.optimize == "transformer" else \
        {"requested": "none", "applied": False, "reason": "export.optimize is none"}
    if optimization["applied"]:
        onnx_logits = OnnxClassifier.from_export(out_dir).logits(texts, cfg.parity_batch_size)
        fused_check = compare("fused ONNX vs the merged PyTorch model", texts, onnx_logits, merged_logits,
                              Tolerance(cfg.max_abs_logit_diff, cfg.min_argmax_agreement))
        if not fused_check["passed"]:  # an optimisation that changes the answers is not shipped; the plain export is
            optimization.update(applied=False, reason=f"the fused graph failed parity ({failure_clause(fused_check)}); "
                                                      f"the unfused dynamo export ships")
    if not optimization["applied"]:
        export_onnx(graph, tokenizer, summary["max_length"], cfg.opset, onnx_path)
        onnx_logits = OnnxClassifier.from_export(out_dir).logits(texts, cfg.parity_batch_size)
    optimization["exporter"] = "torchscript" if optimization["applied"] else "dynamo"
    parity = check_parity(texts, trained, merged_logits, onnx_logits, cfg)
    label_index = {label: position for position, label in enumerate(labels)}
    truth = validation["label"].map(label_index).to_numpy()
    quantization = quantize(out_dir, texts, truth, onnx_logits, cfg)
    shipped = out_dir / (artifacts.ONNX_INT8_MODEL if quantization["shipped"] == "int8" else artifacts.ONNX_MODEL)
    parity.update(onnx_file=shipped.name, onnx_sha256=content_hash(shipped), opset=cfg.opset, optimization=optimization,
                  quantization=quantization, long_text=long_text.record())
    write_json(out_dir / artifacts.PARITY, parity)
    (out_dir / artifacts.REPORT).write_text(render_report(summary, parity), encoding="utf-8")
    return ExportResult(out_dir, parity)


def trained_validation_logits(model_dir: Path, texts: list[str]) -> np.ndarray:
    """The logits train saved for these validation texts; a model trained before they were saved must be retrained."""
    path = model_dir / artifacts.VALIDATION_LOGITS
    if not path.is_file():
        raise InputError(f"{path}: missing (the model was trained before train saved its validation logits, which export's "
                         f"parity compares with); re-run `tuneflow train`")
    summary = read_json(model_dir / artifacts.TRAIN_SUMMARY)
    logits = read_logits(path)
    if summary.get("validation_logits", {}).get("texts_sha256") != texts_hash(texts) or logits.shape != (len(texts), len(summary["labels"])):
        raise InputError(f"{path}: computed on other validation texts than the gated split's {len(texts)} "
                         f"(the data changed since training); re-run `tuneflow train`")
    return logits


def export_onnx(model: torch.nn.Module, tokenizer, max_length: int, opset: int, path: Path) -> None:
    example = tokenizer(["a short example", "a second and somewhat longer example text"], padding=True, return_tensors="pt")
    batch, sequence = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=2, max=max_length)
    with torch.no_grad():
        program = torch.onnx.export(
            model,
            (example["input_ids"], example["attention_mask"]),
            dynamo=True,
            input_names=INPUT_NAMES,
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            opset_version=opset,
            verbose=False,
        )
    program.save(str(path))


def export_torchscript(model: torch.nn.Module, tokenizer, opset: int, path: Path) -> None:
    """The TorchScript exporter's graph: unlike the dynamo one, ONNX Runtime's transformer optimizer matches its
    attention and embedding subgraphs (measured on MiniLM: 6 of 6 Attention fused, vs 0 on the dynamo graph)."""
    example = tokenizer(["a short example", "a second and somewhat longer example text"], padding=True, return_tensors="pt")
    axes = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(model, (example["input_ids"], example["attention_mask"]), str(path), dynamo=False,
                          input_names=INPUT_NAMES, output_names=["logits"], opset_version=opset,
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}})


def fuse_transformer(model: LogitsOnly, tokenizer, cfg: ExportConfig, path: Path) -> dict[str, Any]:
    """`export.optimize: transformer`: write into `path` the TorchScript graph with ONNX Runtime's BERT fusions
    (Attention, EmbedLayerNormalization, BiasGelu) when they cover every layer; otherwise write nothing and say why.
    The caller checks the fused graph's parity before it may ship."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    record: dict[str, Any] = {"requested": "transformer", "applied": False}
    config = getattr(model.model, "config", None)
    shape = {key: getattr(config, key, None) for key in ("model_type", "num_hidden_layers", "num_attention_heads", "hidden_size")}
    if not all(shape.values()):
        return {**record, "reason": f"{type(model.model).__name__} has no transformer config the optimizer can use; "
                                    f"the unfused dynamo export ships"}
    options = FusionOptions("bert")
    # kept as Add + LayerNormalization: ONNX Runtime's CPU SkipLayerNormalization kernel is the slower (onnx_runtime.UNFUSED)
    options.enable_skip_layer_norm = False
    traced = path.with_name(artifacts.ONNX_TRACED_MODEL)
    try:
        export_torchscript(model, tokenizer, cfg.opset, traced)
        optimized = optimize_model(str(traced), model_type="bert", num_heads=shape["num_attention_heads"],
                                   hidden_size=shape["hidden_size"], optimization_options=options)
    except Exception as error:  # an architecture the TorchScript exporter or the optimizer cannot take: the plain export ships
        return {**record, "reason": f"the transformer optimizer failed on {shape['model_type']} ({type(error).__name__}: "
                                    f"{' '.join(str(error).split())[:300]}); the unfused dynamo export ships"}
    finally:
        traced.unlink(missing_ok=True)
    fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    record.update(model_type=shape["model_type"], fused=fused)
    if fused.get("Attention", 0) < shape["num_hidden_layers"]:
        return {**record, "reason": f"ONNX Runtime's transformer optimizer fused {fused.get('Attention', 0)} Attention nodes for "
                                    f"the {shape['num_hidden_layers']} layers of this {shape['model_type']} model; the unfused "
                                    f"dynamo export ships"}
    optimized.save_model_to_file(str(path))
    return {**record, "applied": True,
            "reason": f"fused {', '.join(f'{count} {op}' for op, count in fused.items())} (TorchScript export, ONNX Runtime "
                      f"transformer optimizer)"}


# --- parity ---------------------------------------------------------------------------------------------------

def check_parity(texts: list[str], trained: np.ndarray, merged: np.ndarray, onnx: np.ndarray, cfg: ExportConfig) -> dict[str, Any]:
    """Three comparisons on the validation texts; parity passes when all three do.

    The top-level `max_abs_logit_diff` / `argmax_agreement` stay ONNX vs merged PyTorch (what they always meant)."""
    runtime = Tolerance(cfg.max_abs_logit_diff, cfg.min_argmax_agreement)
    against_trained = Tolerance(cfg.trained_max_abs_logit_diff, cfg.trained_min_argmax_agreement)
    comparisons = {
        "onnx_vs_merged": compare("ONNX Runtime vs the merged PyTorch model", texts, onnx, merged, runtime),
        "merged_vs_trained": compare("merged PyTorch model vs the trained model", texts, merged, trained, against_trained),
        "onnx_vs_trained": compare("ONNX Runtime vs the trained model", texts, onnx, trained, against_trained),
    }
    onnx_vs_merged = comparisons["onnx_vs_merged"]
    return {
        "passed": all(comparison["passed"] for comparison in comparisons.values()),
        "failed": [name for name, comparison in comparisons.items() if not comparison["passed"]],
        "split": "validation",
        "texts": len(texts),
        "max_abs_logit_diff": onnx_vs_merged["max_abs_logit_diff"],
        "argmax_agreement": onnx_vs_merged["argmax_agreement"],
        "thresholds": {"max_abs_logit_diff": cfg.max_abs_logit_diff, "min_argmax_agreement": cfg.min_argmax_agreement,
                       "trained_max_abs_logit_diff": cfg.trained_max_abs_logit_diff,
                       "trained_min_argmax_agreement": cfg.trained_min_argmax_agreement},
        "comparisons": comparisons,
    }


def compare(what: str, texts: list[str], candidate: np.ndarray, reference: np.ndarray, tolerance: Tolerance) -> dict[str, Any]:
    """Largest logit difference and argmax agreement of `candidate` with `reference`; the worst rows when it fails."""
    row_diff = np.abs(candidate - reference).max(axis=-1)
    agrees = candidate.argmax(axis=-1) == reference.argmax(axis=-1)
    max_abs_logit_diff, agreement = float(row_diff.max()), float(agrees.mean())
    passed = max_abs_logit_diff <= tolerance.max_abs_logit_diff and agreement >= tolerance.min_argmax_agreement
    record = {"compared": what, "passed": passed, "texts": len(texts), "max_abs_logit_diff": max_abs_logit_diff,
              "argmax_agreement": agreement, "thresholds": {"max_abs_logit_diff": tolerance.max_abs_logit_diff,
                                                            "min_argmax_agreement": tolerance.min_argmax_agreement}}
    if not passed:
        worst = np.lexsort((-row_diff, agrees))[:WORST_EXAMPLES]  # disagreements first, then the largest differences
        record["worst"] = [{"index": int(row), "text": shorten(texts[row]), "logits": candidate[row].tolist(),
                            "reference_logits": reference[row].tolist(), "max_abs_logit_diff": float(row_diff[row]),
                            "argmax_agrees": bool(agrees[row])} for row in worst]
    return record


def shorten(text: str) -> str:
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"


def failure_summary(parity: dict[str, Any]) -> str:
    """One clause per failed comparison: what was compared, its two measurements and their thresholds."""
    return "; ".join(failure_clause(parity["comparisons"][name]) for name in parity["failed"])


def failure_clause(comparison: dict[str, Any]) -> str:
    thresholds = comparison["thresholds"]
    return (f"{comparison['compared']}: max |Δlogit| {comparison['max_abs_logit_diff']:.2e} "
            f"(≤ {thresholds['max_abs_logit_diff']}), argmax agreement {comparison['argmax_agreement']:.4f} "
            f"(≥ {thresholds['min_argmax_agreement']}) on {comparison['texts']} validation texts")


# --- int8 -----------------------------------------------------------------------------------------------------

def quantize(out_dir: Path, texts: list[str], truth: np.ndarray, fp32_logits: np.ndarray, cfg: ExportConfig) -> dict[str, Any]:
    """Dynamic int8 quantisation of model.onnx when asked; the int8 file ships only if it passes both checks, else
    it is removed, so the export folder holds only files that may ship."""
    if cfg.quantize == "none":
        return {"requested": "none", "shipped": "fp32", "reason": "export.quantize is none"}
    import onnx
    from onnxruntime import quantization

    fp32_path, int8_path = out_dir / artifacts.ONNX_MODEL, out_dir / artifacts.ONNX_INT8_MODEL
    fp32_model = onnx.load(str(fp32_path))
    # the dynamo exporter's recorded intermediate shapes make the quantizer's shape inference fail; it re-infers them
    del fp32_model.graph.value_info[:]
    # per channel: on MiniLM a quarter of per-tensor's largest logit error (0.10 vs 0.41), at the same size.
    # The fused graph's contrib ops (Attention → QAttention) have no ONNX shape inference: their outputs are float.
    quantization.quantize_dynamic(fp32_model, int8_path, per_channel=True, weight_type=quantization.QuantType.QInt8,
                                  extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    int8_logits = OnnxClassifier(int8_path, out_dir / artifacts.ASSETS).logits(texts, cfg.parity_batch_size)

    agreement = float((int8_logits.argmax(axis=-1) == fp32_logits.argmax(axis=-1)).mean())
    accuracy_fp32 = float((fp32_logits.argmax(axis=-1) == truth).mean())
    accuracy_int8 = float((int8_logits.argmax(axis=-1) == truth).mean())
    drop = accuracy_fp32 - accuracy_int8
    refusals = []
    if agreement < cfg.int8_min_argmax_agreement:
        refusals.append(f"argmax agreement with fp32 {agreement:.4f} < export.int8_min_argmax_agreement {cfg.int8_min_argmax_agreement}")
    if drop > cfg.int8_max_accuracy_drop:
        refusals.append(f"validation accuracy drop {drop:.4f} ({accuracy_fp32:.4f} → {accuracy_int8:.4f}) > "
                        f"export.int8_max_accuracy_drop {cfg.int8_max_accuracy_drop}")
    record = {
        "requested": cfg.quantize,
        "shipped": "fp32" if refusals else "int8",
        "weights": "int8 per channel, activations quantised at run time",
        "argmax_agreement": agreement,
        "accuracy_fp32": accuracy_fp32,
        "accuracy_int8": accuracy_int8,
        "accuracy_drop": drop,
        "max_abs_logit_diff": float(np.abs(int8_logits - fp32_logits).max()),
        "size_bytes": {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size},
        "texts": len(texts),
        "thresholds": {"min_argmax_agreement": cfg.int8_min_argmax_agreement, "max_accuracy_drop": cfg.int8_max_accuracy_drop},
        "reason": ("int8 rejected, fp32 ships: " + "; ".join(refusals)) if refusals else
                  (f"int8 ships: argmax agreement with fp32 {agreement:.4f}, validation accuracy {accuracy_fp32:.4f} → "
                   f"{accuracy_int8:.4f}, {int8_path.stat().st_size / fp32_path.stat().st_size:.0%} of the fp32 size"),
    }
    if refusals:
        int8_path.unlink()
    return record


# --- report ---------------------------------------------------------------------------------------------------

def render_report(summary: dict[str, Any], parity: dict[str, Any]) -> str:
    quantization = parity["quantization"]
    lines = [
        f"# Export: {'PASSED' if parity['passed'] else 'FAILED'} parity",
        "",
        f"`{parity['onnx_file']}` ships, from {summary['method']} on {summary['base_model']} ({summary['export']} export, "
        f"opset {parity['opset']}, dynamic batch and sequence up to {summary['max_length']} tokens).",
        "",
        f"Long texts: {summary_long_text(summary).describe()}; the same in parity, evaluation and serving (serving.json).",
        "",
        f"Parity on {parity['texts']} validation texts; the trained model's logits were saved by `tuneflow train`.",
        "",
        "| comparison | max abs logit difference | argmax agreement | result |", "|---|---|---|---|",
        *(f"| {row['compared']} | {row['max_abs_logit_diff']:.2e} (≤ {row['thresholds']['max_abs_logit_diff']}) | "
          f"{row['argmax_agreement']:.4f} (≥ {row['thresholds']['min_argmax_agreement']}) | {'pass' if row['passed'] else '**FAIL**'} |"
          for row in parity["comparisons"].values()),
    ]
    for row in parity["comparisons"].values():
        if row["passed"]:
            continue
        lines += ["", f"Worst rows, {row['compared']}:", "",
                  "| row | text | logits | reference logits | max abs diff |", "|---|---|---|---|---|",
                  *(f"| {example['index']} | {markdown_cell(example['text'])} | {rounded(example['logits'])} | "
                    f"{rounded(example['reference_logits'])} | {example['max_abs_logit_diff']:.3g} |" for example in row["worst"])]
    optimization = parity["optimization"]
    lines += ["", f"Graph optimisation (`export.optimize: {optimization['requested']}`, {optimization['exporter']} exporter): "
                  f"{optimization['reason']}."]
    lines += ["", f"Quantisation (`export.quantize: {quantization['requested']}`): {quantization['reason']}."]
    if "size_bytes" in quantization:
        sizes = quantization["size_bytes"]
        lines += ["", "| model | validation accuracy | size MB |", "|---|---|---|",
                  f"| fp32 `{artifacts.ONNX_MODEL}` | {quantization['accuracy_fp32']:.4f} | {sizes['fp32'] / 1e6:.1f} |",
                  f"| int8 `{artifacts.ONNX_INT8_MODEL}` | {quantization['accuracy_int8']:.4f} | {sizes['int8'] / 1e6:.1f} |"]
    return "\n".join(lines) + "\n"


def rounded(logits: list[float]) -> str:
    return "[" + ", ".join(f"{value:.3f}" for value in logits) + "]"


def markdown_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
