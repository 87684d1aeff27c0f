"""Training practices, resume after SIGKILL, diagnostics and the distributed launch configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TUNEFLOW, gated_params, stage_inputs, topic_frame, write_params
from tuneflow.config import ModelConfig, TrainConfig
from tuneflow.errors import InputError, StageFailed


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> dict[str, Path]:
    frame = topic_frame(20)
    frame = frame[(frame.label != "music") | (frame.index % 3 == 0)]  # imbalanced: few "music" rows
    return stage_inputs("train", gated_params(tmp_path_factory.mktemp("practices"), frame))


def test_every_practice_switched_on_trains_and_records_it(tiny_model, gated, tmp_path):
    from tasks.train import train

    cfg = TrainConfig(method="full", epochs=3, batch_size=4, learning_rate=5e-3, gradient_accumulation_steps=2,
                      gradient_checkpointing=True, class_weights="balanced", layerwise_lr_decay=0.8,
                      gradual_unfreezing=True, deterministic=True, lr_scheduler="cosine", save_steps=3,
                      group_by_length=False)  # the one practice on by default: switched off here
    summary = train(**gated, model_cfg=ModelConfig(base=str(tiny_model), max_length=24), cfg=cfg, out_dir=tmp_path / "model",
                    work_dir=tmp_path / "work").summary
    assert summary["optimizer_steps"] == summary["planned_optimizer_steps"]
    assert summary["max_length"] == 24 and summary["max_length_source"] == "model.max_length"
    diagnostics = summary["diagnostics"]
    assert diagnostics["learning_rate"] and diagnostics["grad_norm"]["count"] > 0 and isinstance(diagnostics["collapsed"], bool)
    assert "Training: full" in (tmp_path / "model" / "report.md").read_text()


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
                 train={"batch_size": 2, "learning_rate": 5e-3, "early_stopping_patience": 50, **train})
    params = load_params(workdir / "params.yaml")
    for stage in ("ingest", "validate"):
        run_stage(STAGES[stage], params)


def test_sigkilled_training_resumes_from_the_last_checkpoint(tiny_model, workdir):
    prepare_workdir(workdir, tiny_model, epochs=12, save_steps=10)
    command = [str(TUNEFLOW), "train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    states = []
    while time.monotonic() < deadline and first.poll() is None:
        states = list((workdir / ".tuneflow").glob("*/checkpoints/*/checkpoint-*/trainer_state.json"))
        if any(json.loads(path.read_text())["global_step"] >= 30 for path in states if path.stat().st_size):
            break
        time.sleep(0.05)
    assert first.poll() is None, "training finished before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (workdir / "artifacts" / "model").exists()

    second = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from checkpoint" in second.stderr
    summary = json.loads((workdir / "artifacts" / "model" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] >= 30
    train_rows = len(pd.read_parquet(workdir / "artifacts" / "validation" / "data" / "train.parquet"))
    assert summary["optimizer_steps"] == summary["planned_optimizer_steps"] == -(-train_rows // 2) * 12  # batch 2, 12 epochs
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
