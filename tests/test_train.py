"""Training practices, resume after SIGKILL, diagnostics and the distributed launch configs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from conftest import TUNEFLOW, gated_params, stage_inputs, topic_frame, write_params
from tuneflow.config import ModelConfig, TrainConfig
from tuneflow.errors import InputError, StageFailed


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> dict[str, Path]:
    frame = topic_frame(20)
    frame = frame[(frame.label != "music") | (frame.index % 3 == 0)]  # imbalanced: few "music" rows
    return stage_inputs("train", gated_params(tmp_path_factory.mktemp("practices"), frame))


class EpochRecorder(TrainerCallback):
    """What the Trainer did, seen from a callback added after tuneflow's own: which parameters could train at the
    start of each epoch and which ones that epoch's steps changed, the steps it checkpointed at, and the
    switches in force when training began."""

    def __init__(self):
        self.epochs: list[dict[str, set[str]]] = []
        self.saved_at: list[int] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.gradient_checkpointing = model.is_gradient_checkpointing
        self.deterministic = torch.are_deterministic_algorithms_enabled()

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        self.epochs.append({"trainable": {name for name, parameter in model.named_parameters() if parameter.requires_grad}})

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.epochs[-1]["changed"] = {name for name, parameter in model.named_parameters()
                                      if not torch.equal(parameter.detach(), self.before[name])}

    def on_save(self, args, state, control, **kwargs):
        self.saved_at.append(state.global_step)


@dataclass
class Practiced:
    trainer: Any
    recorder: EpochRecorder
    summary: dict[str, Any]
    cfg: TrainConfig
    train_labels: list[int]
    out_dir: Path


PRACTICES = dict(method="full", epochs=4, batch_size=4, learning_rate=5e-3, gradient_accumulation_steps=2,
                 gradient_checkpointing=True, class_weights="balanced", layerwise_lr_decay=0.8, gradual_unfreezing=True,
                 deterministic=True, lr_scheduler="cosine", save_steps=3, group_by_length=True,
                 early_stopping_patience=10,  # no early stop: every epoch of the unfreezing schedule runs
                 collapse_restart=False)  # the tiny model may predict one class: one Trainer, as built


@pytest.fixture(scope="module")
def practiced(tiny_model, gated, tmp_path_factory) -> Practiced:
    """One `train()` with every practice switched on, keeping the Trainer it built (and a recorder added to it)."""
    import tasks.train
    from tasks.train import train

    built, recorder = [], EpochRecorder()

    def build_and_record(*args, **kwargs):
        trainer = real_build_trainer(*args, **kwargs)
        trainer.add_callback(recorder)
        built.append(trainer)
        return trainer

    real_build_trainer = tasks.train.build_trainer
    folder, cfg = tmp_path_factory.mktemp("practiced"), TrainConfig(**PRACTICES)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tasks.train, "build_trainer", build_and_record)
        for name in ("CUBLAS_WORKSPACE_CONFIG", "CUDA_LAUNCH_BLOCKING", "FLASH_ATTENTION_DETERMINISTIC"):
            patch.delenv(name, raising=False)  # full_determinism sets these: restored afterwards
        torch.use_deterministic_algorithms(False)  # so that the recorder sees train() switch it on
        try:
            summary = train(**gated, model_cfg=ModelConfig(base=str(tiny_model), max_length=24), cfg=cfg,
                            out_dir=folder / "model", work_dir=folder / "work").summary
        finally:
            torch.use_deterministic_algorithms(False)  # train() leaves it on for the whole process
    (trainer,) = built
    return Practiced(trainer, recorder, summary, cfg, [row["labels"] for row in trainer.train_dataset], folder / "model")


def block(name: str) -> str:
    """The layer group of a tiny-BERT parameter, as layer-wise decay and gradual unfreezing see it."""
    if name.startswith("bert.embeddings."):
        return "embeddings"
    if name.startswith("bert.encoder.layer."):
        return "block " + name.split(".")[3]
    assert name.startswith(("bert.pooler.", "classifier.")), name
    return "head"


def test_class_weights_balanced_changes_the_trainers_loss(practiced):
    from sklearn.utils.class_weight import compute_class_weight
    from transformers.modeling_outputs import SequenceClassifierOutput

    labels = np.array(practiced.train_labels)
    counts = np.bincount(labels)
    assert counts.min() * 2 < counts.max()  # the fixture's training split is imbalanced
    weights = torch.tensor(compute_class_weight("balanced", classes=np.arange(len(counts)), y=labels), dtype=torch.float32)
    rare, common = int(counts.argmin()), int(counts.argmax())
    # an imbalanced batch (three common, one rare) scored by a model that favours the common class
    batch = torch.tensor([common, common, common, rare])
    logits = torch.full((4, len(counts)), -1.0)
    logits[:, common] = 2.0
    loss = practiced.trainer.compute_loss(lambda **inputs: SequenceClassifierOutput(logits=logits), {"labels": batch})
    weighted = torch.nn.functional.cross_entropy(logits, batch, weight=weights)
    unweighted = torch.nn.functional.cross_entropy(logits, batch)
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-6)
    assert weighted.item() > 2 * unweighted.item()  # the rare row's error counts for more


def test_layerwise_lr_decay_sets_the_optimizers_param_groups(practiced):
    lr, decay = practiced.cfg.learning_rate, practiced.cfg.layerwise_lr_decay
    optimizer = practiced.trainer.create_optimizer()  # the one the Trainer trained with
    group_lr = {id(parameter): group["initial_lr"] for group in optimizer.param_groups for parameter in group["params"]}
    by_block: dict[str, set[float]] = {}
    for name, parameter in practiced.trainer.model.named_parameters():
        by_block.setdefault(block(name), set()).add(group_lr[id(parameter)])  # KeyError: a parameter it never trains
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(group_lr)
    # lr·decay^(L−i) for block i of L = 2, embeddings one step lower still, the head at lr
    assert {name: sorted(lrs) for name, lrs in by_block.items()} == {
        "embeddings": [pytest.approx(lr * decay**3)], "block 0": [pytest.approx(lr * decay**2)],
        "block 1": [pytest.approx(lr * decay)], "head": [pytest.approx(lr)]}


def test_gradual_unfreezing_changes_requires_grad_per_epoch(practiced):
    def blocks(names: set[str]) -> set[str]:
        return {block(name) for name in names}

    opened = [blocks(epoch["trainable"]) for epoch in practiced.recorder.epochs]
    changed = [blocks(epoch["changed"]) for epoch in practiced.recorder.epochs]
    assert opened == [{"head"}, {"head", "block 1"}, {"head", "block 1", "block 0"},
                      {"head", "block 1", "block 0", "embeddings"}]
    assert changed == opened  # the steps of each epoch moved exactly the parameters open in it


def test_every_practice_switched_on_trains_and_records_it(practiced, gated):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    summary, trainer, recorder = practiced.summary, practiced.trainer, practiced.recorder
    train_rows = len(pd.read_parquet(gated["gated_data"] / "train.parquet"))
    steps_per_epoch = math.ceil(math.ceil(train_rows / 4) / 2)  # batches of 4, two per optimizer step
    assert summary["optimizer_steps"] == summary["planned_optimizer_steps"] == steps_per_epoch * 4
    assert summary["max_length"] == 24 and summary["max_length_source"] == "model.max_length"
    assert recorder.gradient_checkpointing and recorder.deterministic
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    # save_steps 3 on top of the per-epoch saves
    assert set(range(3, summary["optimizer_steps"] + 1, 3)) <= set(recorder.saved_at)
    # cosine decay after the warm-up, not linear
    schedule, total = trainer.lr_scheduler.lr_lambdas[0], summary["optimizer_steps"]
    warmup = trainer.args.get_warmup_steps(total)
    assert [schedule(step) for step in range(warmup, total)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) for step in range(warmup, total)])
    assert "Training: full" in (practiced.out_dir / "report.md").read_text()


def test_layerwise_groups_decay_from_the_head_down(tiny_model):
    from transformers import AutoModelForSequenceClassification

    from tuneflow.training import layerwise_param_groups

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3, ignore_mismatched_sizes=True)
    groups = layerwise_param_groups(model, 1e-3, 0.5, 0.01)
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    lrs = sorted({group["lr"] for group in groups})
    assert lrs == pytest.approx([1e-3 * 0.5**3, 1e-3 * 0.5**2, 1e-3 * 0.5, 1e-3])  # embeddings, block 0, block 1, head
    assert all(group["weight_decay"] == 0 for group in groups if group["params"][0].ndim == 1)


def test_gradual_unfreezing_opens_groups_top_down(tiny_model):
    from transformers import AutoModelForSequenceClassification

    from tuneflow.training import GradualUnfreezing, unfreezing_groups

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3, ignore_mismatched_sizes=True)
    groups = unfreezing_groups(model)  # block 1, block 0, embeddings
    callback = GradualUnfreezing(groups, epochs=4)
    opened = []
    for epoch in range(4):
        callback.apply(epoch)
        opened.append([all(p.requires_grad for p in group) for group in groups])
    assert opened == [[False, False, False], [True, False, False], [True, True, False], [True, True, True]]
    assert model.classifier.weight.requires_grad  # the head always trains


def test_class_weighted_loss_matches_weighted_cross_entropy():
    from tuneflow.training import balanced_class_weights, weighted_loss

    weights = balanced_class_weights([0, 0, 0, 1], 3)
    assert weights.tolist() == pytest.approx([4 / 6, 2.0, 1.0])  # class 2 absent: weight 1
    logits, labels = torch.randn(4, 3), torch.tensor([0, 0, 0, 1])
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=weights)
    assert weighted_loss(weights)({"logits": logits}, labels) == pytest.approx(expected.item(), rel=1e-5)


def test_max_length_from_token_length_percentiles():
    from tasks.train import choose_max_length

    assert choose_max_length(list(range(1, 101)), 99, 512) == 104  # P99 = 99.01, rounded up to a multiple of 8
    assert choose_max_length([600] * 10, 99, 512) == 512
    assert choose_max_length([3, 4], 99, 512) == 8
    with pytest.raises(ValueError, match="max_length"):
        ModelConfig(max_length=4)
    assert ModelConfig(max_length=None).max_length is None


def test_diagnosis_flags_overfitting_rising_loss_collapse_and_explosions():
    from tuneflow.training import diagnose

    overfit = ([{"step": s, "loss": 1.0 - 0.05 * s, "grad_norm": 1.0} for s in range(1, 13)]
               + [{"step": 4, "eval_loss": 0.8}, {"step": 8, "eval_loss": 0.9}, {"step": 12, "eval_loss": 1.1}])
    result = diagnose(overfit, classes=2)
    assert result["overfitting"] and result["learning_rate"].startswith("ok")
    rising = [{"step": s, "loss": 1.0 + 0.1 * s, "grad_norm": 100.0 if s == 5 else 1.0} for s in range(1, 13)]
    result = diagnose(rising, classes=2)
    assert result["learning_rate"].startswith("loss rising") and result["grad_norm"]["explosions"] == 1
    assert any("gradient explosion" in warning for warning in result["warnings"])
    flat = [{"step": s, "loss": 0.69, "grad_norm": float("nan") if s == 2 else 0.1} for s in range(1, 13)]
    result = diagnose(flat, classes=2)
    assert result["learning_rate"].startswith("loss flat") and result["grad_norm"]["non_finite"] == 1
    assert not result["collapsed"]
    # a flat-looking loss, and every validation text given one class
    collapsed = flat + [{"step": 6, "eval_loss": 0.69, "eval_predicted_classes": 2},
                        {"step": 12, "eval_loss": 0.69, "eval_predicted_classes": 1}]
    result = diagnose(collapsed, classes=2)
    assert result["collapsed"] and result["learning_rate"].startswith("collapsed")
    assert any("lower train.learning_rate" in warning for warning in result["warnings"])
    assert not diagnose(collapsed, classes=1)["collapsed"]
    recovered = collapsed[:-1] + [{"step": 12, "eval_loss": 0.5, "eval_predicted_classes": 3}]
    assert not diagnose(recovered, classes=5)["collapsed"]


def test_empty_weight_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    from tasks.train import weight_files_ok

    save_file({"lora_A": torch.zeros(0, 4)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(StageFailed, match="saved weights are empty"):
        weight_files_ok(tmp_path)
    save_file({"lora_A": torch.zeros(2, 4)}, str(tmp_path / "adapter_model.safetensors"))
    assert weight_files_ok(tmp_path)["adapter_model.safetensors"] > 0


def prepare_workdir(workdir: Path, tiny_model: Path, **train) -> None:
    from pipeline.runner import run_stage
    from pipeline.table import STAGES
    from tuneflow.config import load_params

    topic_frame(20).to_csv(workdir / "topics.csv", index=False)
    write_params(workdir, data={"source": "topics.csv"}, model={"base": str(tiny_model), "max_length": 24},
                 # the collapse restart off: a restart trains afresh, so the resume these tests check would not be the kept run
                 train={"batch_size": 2, "learning_rate": 5e-3, "early_stopping_patience": 50, "collapse_restart": False, **train})
    params = load_params(workdir / "params.yaml")
    for stage in ("ingest", "validate"):
        run_stage(STAGES[stage], params)


def checkpoint_steps(workdir: Path) -> list[int]:
    """Global steps of the checkpoints the Trainer finished writing (trainer_state.json, written last, parses)."""
    steps = []
    for path in (workdir / ".tuneflow").glob("*/checkpoints/*/checkpoint-*/trainer_state.json"):
        try:
            steps.append(json.loads(path.read_text())["global_step"])
        except (OSError, ValueError, KeyError):  # being written, or rotated away
            continue
    return sorted(steps)


@pytest.mark.slow
def test_sigkilled_training_resumes_from_the_last_checkpoint(tiny_model, workdir):
    prepare_workdir(workdir, tiny_model, epochs=2, save_steps=5)
    command = [str(TUNEFLOW), "train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        safety = time.monotonic() + 600  # only against a hang; the kill waits for the first checkpoint, not a clock
        while not checkpoint_steps(workdir) and first.poll() is None and time.monotonic() < safety:
            time.sleep(0.05)
        assert first.poll() is None, "training ended before writing a checkpoint"
        assert checkpoint_steps(workdir), "no checkpoint within the safety timeout"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (workdir / "artifacts" / "model").exists()
    resume_step = checkpoint_steps(workdir)[-1]
    assert resume_step > 0

    # at info level the Trainer itself says where it continued (tuneflow's own line could be printed without resuming)
    second = subprocess.run(command, cwd=workdir, env={**env, "TRANSFORMERS_VERBOSITY": "info"}, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"Continuing training from global step {resume_step}\n" in second.stderr
    summary = json.loads((workdir / "artifacts" / "model" / "train_summary.json").read_text())
    train_rows = len(pd.read_parquet(workdir / "artifacts" / "validation" / "data" / "train.parquet"))
    planned = math.ceil(train_rows / 2) * 2  # batch 2, 2 epochs
    assert "resuming from checkpoint" in second.stderr and f"(step {resume_step} of {planned})" in second.stderr
    assert summary["resumed_from_step"] == resume_step
    assert summary["optimizer_steps"] == summary["planned_optimizer_steps"] == planned
    assert not list((workdir / ".tuneflow").glob("*/checkpoints/*"))  # pruned after success


def test_changed_config_does_not_resume_a_stale_checkpoint(tmp_path):
    from tasks.train import run_key

    model = ModelConfig()
    assert run_key(model, TrainConfig(), "d1") == run_key(model, TrainConfig(), "d1")
    assert run_key(model, TrainConfig(), "d1") != run_key(model, TrainConfig(epochs=5), "d1")
    assert run_key(model, TrainConfig(), "d1") != run_key(model, TrainConfig(), "d2")


def test_launch_configs_are_generated_and_valid(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from tuneflow.distributed import DEPLOY, KINDS, write_configs

    for path in write_configs(tmp_path):
        checked_in = DEPLOY / path.relative_to(tmp_path)
        assert checked_in.read_text() == path.read_text(), f"{checked_in} is stale: run python -m tuneflow.distributed"
    for kind in KINDS:
        config = load_config_from_file(str(DEPLOY / "accelerate" / f"{kind}.yaml"))
        assert config.distributed_type.value == ("MULTI_GPU" if kind == "ddp" else "DEEPSPEED")
    zero3 = json.loads((DEPLOY / "deepspeed" / "zero3.json").read_text())
    assert zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_distributed_without_a_launcher_says_how_to_launch(tiny_model, gated, tmp_path, monkeypatch):
    from tasks.train import train

    for name in ("LOCAL_RANK", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InputError, match=r"train.distributed=zero3 needs a launcher: accelerate launch --config_file deploy/accelerate/zero3.yaml"):
        train(**gated, model_cfg=ModelConfig(base=str(tiny_model)), cfg=TrainConfig(distributed="zero3"), out_dir=tmp_path / "m",
              work_dir=tmp_path / "w")


@pytest.mark.slow
def test_single_process_cpu_run_under_accelerate_launch(tiny_model, workdir):
    prepare_workdir(workdir, tiny_model, epochs=1)
    accelerate = Path(sys.executable).parent / "accelerate"
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([str(accelerate), "launch", "--config_file", str(repo / "deploy" / "accelerate" / "ddp.yaml"),
                             "--cpu", "--num_processes", "1", "-m", "cli", "train", "--set", "train.distributed=ddp"],
                            cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((workdir / "artifacts" / "model" / "train_summary.json").read_text())
    assert summary["distributed"] == "ddp" and summary["world_size"] == 1 and summary["weights_bytes"] > 0


def test_early_stopping_stops_when_validation_macro_f1_stops_improving(tiny_model, gated, tmp_path):
    """learning rate 1e-12: validation macro-F1 never improves, so patience 1 stops after the second of 6 epochs."""
    from tasks.train import train

    cfg = TrainConfig(epochs=6, batch_size=8, learning_rate=1e-12, warmup_ratio=0.0, early_stopping_patience=1, save_every_s=3600)
    summary = train(**gated, model_cfg=ModelConfig(base=str(tiny_model), max_length=32), cfg=cfg,
                    out_dir=tmp_path / "model", work_dir=tmp_path / "work").summary
    assert summary["epochs_run"] == 2 and summary["best_epoch"] == 1
    assert summary["optimizer_steps"] < summary["planned_optimizer_steps"]


def test_a_checkpoint_whose_trainer_state_was_cut_short_is_not_resumed(tmp_path):
    from tasks.train import last_complete_checkpoint

    whole, torn = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    for folder, state in ((whole, '{"global_step": 4}'), (torn, '{"global_st')):
        folder.mkdir()
        (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == whole and not torn.exists()
