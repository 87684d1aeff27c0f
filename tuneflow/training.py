"""Training practices the Trainer does not have built in, as Trainer callbacks and optimizer/loss hooks,
plus the diagnostics read from the Trainer's log history."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from tuneflow import progress


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks (a ModuleList as long as config.num_hidden_layers), found through any wrapper."""
    count = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the {count} encoder layers of {type(model).__name__}")


class CheckpointCadence(TrainerCallback):
    """Save a checkpoint every `every_s` seconds of training (or every `steps` optimizer steps when set),
    on top of the per-epoch saves, so an interruption loses little work."""

    def __init__(self, every_s: float, steps: int | None):
        self.every_s, self.steps = every_s, steps
        self.last_save = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        due = state.global_step % self.steps == 0 if self.steps else time.monotonic() - self.last_save >= self.every_s
        if due:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        self.last_save = time.monotonic()


class ProgressLines(TrainerCallback):
    """Training progress as one line every `every_s` seconds and one per evaluation, in place of the Trainer's
    progress bar: readable where stderr is a log (the Prefect UI, CI, a file) and a bar would flood it."""

    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self.last = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        where = f"step {state.global_step}/{state.max_steps}, epoch {state.epoch or 0:.2f}"
        if "eval_macro_f1" in logs:
            progress.say(f"[tuneflow] train: {where}: validation macro-F1 {logs['eval_macro_f1']:.4f}, "
                         f"accuracy {logs['eval_accuracy']:.4f}, loss {logs['eval_loss']:.4f}")
        elif "loss" in logs and time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            progress.say(f"[tuneflow] train: {where}: loss {logs['loss']:.4f}, learning rate {logs.get('learning_rate', 0):.3g}")


class GradualUnfreezing(TrainerCallback):
    """ULMFiT-style: train the head first, then unfreeze encoder layer groups top-down, one group per epoch,
    so every trainable layer is unfrozen by the last epoch. Idempotent per epoch, so a resumed run agrees."""

    def __init__(self, groups: list[list[torch.nn.Parameter]], epochs: float):
        self.groups = groups
        self.per_epoch = math.ceil(len(groups) / max(1, math.ceil(epochs) - 1)) if groups else 0

    def apply(self, epoch: int) -> None:
        open_groups = min(len(self.groups), epoch * self.per_epoch)
        for index, group in enumerate(self.groups):
            for parameter in group:
                parameter.requires_grad = index < open_groups

    def on_train_begin(self, args, state, control, **kwargs):
        self.apply(int(state.epoch or 0))

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.apply(int(state.epoch or 0))


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates ranks from gradient importance after each optimizer step (PEFT leaves the call to
    the training loop; the Trainer does not make it)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


def unfreezing_groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """Trainable encoder blocks top-down, then the embeddings: the order gradual unfreezing opens them."""
    groups = [[p for p in block.parameters() if p.requires_grad] for block in reversed(list(encoder_layers(model)))]
    embeddings = [p for name, p in model.named_parameters() if "embeddings" in name and p.requires_grad]
    return [group for group in [*groups, embeddings] if group]


def layerwise_param_groups(model: torch.nn.Module, lr: float, decay: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups for every trainable parameter: the head gets `lr`, block i of L gets lr·decay^(L-i),
    embeddings lr·decay^(L+1); biases and norms get no weight decay."""
    layers = list(encoder_layers(model))
    depth = {id(p): index + 1 for index, block in enumerate(layers) for p in block.parameters()}
    top = len(layers) + 1
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        level = 0 if "embeddings" in name else depth.get(id(parameter), top)
        groups.setdefault((level, parameter.ndim > 1), []).append(parameter)
    return [{"params": params, "lr": lr * decay ** (top - level), "weight_decay": weight_decay if decays else 0.0}
            for (level, decays), params in sorted(groups.items())]


def weighted_loss(weights: torch.Tensor):
    """`compute_loss_func` for the Trainer: class-weighted cross-entropy, normalised by the items in the
    (accumulated) batch so gradient accumulation gives the same loss as one big batch."""

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        per_item = torch.nn.functional.cross_entropy(logits.float(), labels, weight=weights.to(logits.device), reduction="none")
        if num_items_in_batch is None:
            return per_item.sum() / weights.to(logits.device)[labels].sum()
        return per_item.sum() / num_items_in_batch

    return loss


def balanced_class_weights(label_ids: list[int], classes: int) -> torch.Tensor:
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(label_ids)
    weights = np.ones(classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=np.asarray(label_ids))
    return torch.tensor(weights, dtype=torch.float32)


def class_ratio(label_ids: list[int]) -> float:
    """Largest over smallest class count among the classes present (1.0 for one class)."""
    counts = np.bincount(np.asarray(label_ids, dtype=int))
    counts = counts[counts > 0]
    return float(counts.max() / counts.min()) if counts.size else 1.0


def class_weighting(setting: str, label_ids: list[int], auto_ratio: float) -> dict[str, Any]:
    """What `train.class_weights` resolves to on this train split: `auto` is balanced when the largest/smallest
    class ratio is at least `auto_ratio`, none otherwise. The record goes into train_summary.json."""
    ratio = class_ratio(label_ids)
    applied = setting if setting != "auto" else ("balanced" if ratio >= auto_ratio else "none")
    record: dict[str, Any] = {"setting": setting, "applied": applied, "train_class_ratio": round(ratio, 4)}
    if setting == "auto":
        record["auto_ratio"] = auto_ratio
        record["reason"] = (f"train class ratio {ratio:.2f} {'≥' if applied == 'balanced' else '<'} {auto_ratio:g}: "
                            f"{'balanced weighted cross-entropy' if applied == 'balanced' else 'plain cross-entropy'}")
    return record


def majority_macro_f1(labels: Sequence[int]) -> float:
    """Macro-F1 (as the Trainer's evaluation computes it) of answering the most common class for every text: what a
    model that learned nothing scores. Any one-class answer scores at most this."""
    from sklearn.metrics import f1_score

    labels = np.asarray(labels)
    return float(f1_score(labels, np.full(len(labels), np.bincount(labels).argmax()), average="macro"))


def attempt_record(history: list[dict[str, Any]], learning_rate: float, seed: int, epochs: float, seconds: float,
                   classes: int, keeps_best: bool, stuck_at_or_below: float) -> dict[str, Any]:
    """One training attempt, as train_summary.json's `attempts` lists it: its learning rate, seed, epochs and time, each
    validation evaluation (epoch, macro-F1, accuracy, classes predicted), the macro-F1 of the epoch it keeps, and
    `stuck`: that macro-F1 is at or below `stuck_at_or_below` (the majority answer's plus the collapse margin)."""
    evals = [{"epoch": entry["epoch"], "macro_f1": entry["eval_macro_f1"], "accuracy": entry["eval_accuracy"],
              "predicted_classes": entry.get("eval_predicted_classes")} for entry in history if "eval_macro_f1" in entry]
    kept = max(e["macro_f1"] for e in evals) if keeps_best else evals[-1]["macro_f1"]
    return {"learning_rate": learning_rate, "seed": seed, "epochs": epochs, "train_time_s": round(seconds, 2),
            "validation": evals, "kept_macro_f1": kept, "stuck": kept <= stuck_at_or_below,
            "collapsed": diagnose(history, classes)["collapsed"]}


def series(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of one logged quantity ("loss", "eval_loss", "grad_norm") from the Trainer's log history."""
    return [(entry["step"], entry[key]) for entry in history if key in entry]


def diagnose(history: list[dict[str, Any]], classes: int, explosion_factor: float = 10.0) -> dict[str, Any]:
    """Overfitting, learning-rate, collapse and gradient-norm verdicts from the Trainer's log history."""
    train, evals = series(history, "loss"), series(history, "eval_loss")
    predicted_classes = series(history, "eval_predicted_classes")
    norms = np.array([norm for _, norm in series(history, "grad_norm")], dtype=float)
    warnings: list[str] = []

    overfitting = False
    if len(evals) >= 2 and len(train) >= 2:
        best_eval = min(loss for _, loss in evals)
        last_eval_step, last_eval = evals[-1]
        train_before = [loss for step, loss in train if step <= evals[0][0]] or [train[0][1]]
        train_after = [loss for step, loss in train if step > evals[-2][0]] or [train[-1][1]]
        overfitting = last_eval > best_eval * 1.02 and np.mean(train_after) < np.mean(train_before)
        if overfitting:
            warnings.append(f"overfitting: validation loss rose to {last_eval:.4f} (best {best_eval:.4f}) while training loss kept falling")

    learning_rate = "unknown (too few logged steps)"
    if len(train) >= 4:
        window = max(1, len(train) // 4)
        first, last = np.mean([loss for _, loss in train[:window]]), np.mean([loss for _, loss in train[-window:]])
        change = (last - first) / max(abs(first), 1e-12)
        if not np.isfinite(last) or change > 0.05:
            learning_rate = "loss rising: learning rate likely too high"
        elif change > -0.02:
            learning_rate = "loss flat: learning rate too low, or the model is not learning"
        else:
            learning_rate = "ok: loss falling"
        if not learning_rate.startswith("ok"):
            warnings.append(f"training loss {first:.4f} → {last:.4f}: {learning_rate}")

    # A fine-tuned encoder that answers one class for everything has diverged (on MR, LoRA at twice the default
    # learning rate ended at validation accuracy 0.50 this way); the loss alone can look merely flat.
    collapsed = classes > 1 and bool(predicted_classes) and predicted_classes[-1][1] == 1
    if collapsed:
        learning_rate = "collapsed: one class predicted for every validation text; learning rate likely too high"
        warnings.append(f"{learning_rate} (lower train.learning_rate)")

    grad: dict[str, Any] = {"count": int(norms.size)}
    if norms.size:
        finite = norms[np.isfinite(norms)]
        grad.update({"non_finite": int(norms.size - finite.size)})
        if finite.size:
            median = float(np.median(finite))
            grad.update({"mean": float(finite.mean()), "median": median, "p95": float(np.percentile(finite, 95)),
                         "max": float(finite.max()), "explosions": int((finite > explosion_factor * max(median, 1e-12)).sum())})
        if grad["non_finite"]:
            warnings.append(f"gradient norm was inf/nan at {grad['non_finite']} logged steps")
        if grad.get("explosions"):
            warnings.append(f"gradient explosion: {grad['explosions']} logged steps above {explosion_factor:g}x the median "
                            f"norm {grad['median']:.3g} (max {grad['max']:.3g}); clipping at train.max_grad_norm")
    return {"overfitting": bool(overfitting), "learning_rate": learning_rate, "collapsed": collapsed, "grad_norm": grad,
            "warnings": warnings,
            "final_train_loss": train[-1][1] if train else None, "final_validation_loss": evals[-1][1] if evals else None}


def write_curves(history: list[dict[str, Any]], train_csv: Path, validation_csv: Path) -> None:
    """The curves as data by optimizer step, what `dvc plots show` draws (dvc.yaml's plots, from the stage table)."""
    import pandas as pd

    train = [{"step": entry["step"], "loss": entry["loss"]} for entry in history if "loss" in entry]
    evals = [{"step": entry["step"], "loss": entry["eval_loss"], "macro_f1": entry["eval_macro_f1"],
              "accuracy": entry["eval_accuracy"]} for entry in history if "eval_macro_f1" in entry]
    pd.DataFrame(train, columns=["step", "loss"]).to_csv(train_csv, index=False)
    pd.DataFrame(evals, columns=["step", "loss", "macro_f1", "accuracy"]).to_csv(validation_csv, index=False)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Train vs validation loss by optimizer step, and the gradient norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals, norms = series(history, "loss"), series(history, "eval_loss"), series(history, "grad_norm")
    figure, (loss_axes, norm_axes) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    if train:
        loss_axes.plot(*zip(*train), label="train loss")
    if evals:
        loss_axes.plot(*zip(*evals), marker="o", label="validation loss")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    loss_axes.set_title("Training curves")
    if norms:
        norm_axes.plot(*zip(*norms), color="tab:red")
    norm_axes.set_ylabel("gradient norm (before clipping)")
    norm_axes.set_xlabel("optimizer step")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
