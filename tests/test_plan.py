"""`tuneflow plan`: estimates for every method on a tiny model, the recommendation rule, and one-line errors."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, gated_params, topic_frame, write_params
from tuneflow import artifacts
from tuneflow.artifacts import read_json
from tuneflow.methods import METHODS

TINY = {"epochs": 1, "batch_size": 4, "eval_batch_size": 8}


def make_plan(params, **kwargs):
    import tasks.train as train_stage
    from tuneflow.data import read_splits
    from tuneflow.planning import plan

    gated = Path(params.artifacts) / artifacts.VALIDATION / artifacts.GATED_DATA
    return plan(params, read_splits(gated), read_json(gated / artifacts.DATA_CARD), train_stage, steps=1, **kwargs)


@pytest.fixture(scope="module")
def gated(tiny_model, tmp_path_factory):
    return gated_params(tmp_path_factory.mktemp("plan"), topic_frame(20), model={"base": str(tiny_model), "max_length": 32},
                        train=TINY)


@pytest.fixture(scope="module")
def planned(gated):
    """Four methods of different kinds: the quick tests' plan."""
    return make_plan(gated, methods=["full", "lora", "ia3", "prefix"])


@pytest.mark.slow
def test_every_method_gets_positive_estimates_and_a_recommendation(gated):
    planned = make_plan(gated)
    rows = {row.method: row for row in planned.estimates}
    assert list(rows) == list(METHODS)
    for row in rows.values():
        assert row.status == "ok", row
        for value in (row.trainable_params, row.peak_memory_mb, row.time_per_epoch_s, row.artifact_mb, row.expected_macro_f1):
            assert value > 0, row
        assert row.trainable_params <= row.total_params
    assert planned.recommendation["method"] in rows and rows[planned.recommendation["method"]].fits
    assert planned.recommendation["reason"]
    # full fine-tuning trains every weight and saves them all: more than any adapter
    assert rows["full"].trainable_params == rows["full"].total_params
    assert rows["full"].artifact_mb > rows["lora"].artifact_mb > rows["ia3"].artifact_mb


def test_trainable_params_follow_the_built_model_when_the_lora_rank_changes(gated):
    import tasks.train as train_stage
    from tuneflow.methods import RunInfo

    planned, built = {}, {}
    for rank in (2, 8):
        params = gated.model_copy(update={"train": gated.train.model_copy(
            update={"lora": gated.train.lora.model_copy(update={"r": rank})})})
        planned[rank] = make_plan(params, methods=["lora"]).estimates[0].trainable_params
        model = train_stage.build_model(METHODS["lora"], params.model, params.train, ["money", "music", "sport"],
                                        RunInfo(10, False), 32)
        built[rank] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert planned == built
    assert planned[8] > planned[2]


def test_a_memory_limit_below_a_methods_estimate_removes_it_from_the_recommendation(planned):
    from tuneflow.planning import recommend

    rows = copy.deepcopy(planned.estimates)
    chosen = next(row for row in rows if row.method == planned.recommendation["method"])
    below = chosen.peak_memory_mb - 0.1
    picked = recommend(rows, below, None)
    assert picked["method"] != chosen.method
    assert not chosen.fits and "peak memory" in chosen.excluded_because
    assert all(row.peak_memory_mb <= below for row in rows if row.fits)
    nothing = recommend(rows, min(row.peak_memory_mb for row in rows) - 1, None)
    assert nothing["method"] is None and "no method fits" in nothing["reason"]


def test_a_time_budget_below_a_methods_estimate_removes_it(planned):
    from tuneflow.planning import recommend

    rows = copy.deepcopy(planned.estimates)
    chosen = next(row for row in rows if row.method == planned.recommendation["method"])
    picked = recommend(rows, math.inf, chosen.train_time_s * 0.99)
    assert picked["method"] != chosen.method and "budget" in chosen.excluded_because


def test_equal_expected_quality_goes_to_the_fastest():
    from tuneflow.planning import QUALITY_TOLERANCE, Estimate, recommend

    def row(name, quality, seconds):
        return Estimate(name, "", trainable_params=1, total_params=1, peak_memory_mb=100, time_per_epoch_s=seconds,
                        train_time_s=seconds, artifact_mb=1, expected_macro_f1=quality)

    rows = [row("full", 0.83, 300), row("lora", 0.83 - QUALITY_TOLERANCE / 2, 180), row("prompt", 0.75, 50)]
    assert recommend(rows, 1000, None)["method"] == "lora"
    rows[1].expected_macro_f1 = 0.83 - 2 * QUALITY_TOLERANCE
    assert recommend(rows, 1000, None)["method"] == "full"


def test_batch_shapes_the_calibration_did_not_meet_add_memory_not_time():
    from tuneflow.config import load_params
    from tuneflow.planning import Calibration, estimate

    # a first step at a new length that took 2 s longer (as on shared cores): not a cost of every new shape
    calibration = Calibration(trainable_params=1, total_params=1, points=[(16.0, 0.1), (32.0, 0.2)], timings={},
                              setup_s=0.5, eval_s_per_row=0.001, save_s=0.01, weights_bytes=1, peak_added_mb=10.0,
                              gpu_peak_mb=None, new_shape_mb=5.0, new_shape_s=2.0)
    params = load_params(REPO / "params.yaml")
    few, many = (estimate("lora", calibration, params, [16.0, 24.0, 32.0] * 10, shapes, 20, 100.0, 1.0, {}, 32)
                 for shapes in (3, 43))
    assert few.time_per_epoch_s == many.time_per_epoch_s
    assert many.peak_memory_mb - few.peak_memory_mb == pytest.approx(40 * 5.0)


def test_a_new_shapes_memory_counts_where_it_reuses_memory_freed_before():
    """The allocations a step at a new length keeps land in memory the longest batch freed: RSS does not grow, but
    the next long batch has to grow the heap; the clock measures them as the allocator's held memory."""
    import ctypes

    from transformers import TrainerControl

    from tuneflow.planning import _rss_mb, _StepClock

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("no glibc mallinfo2 here: the clock falls back to RSS")
    block = 64 * 1024  # below glibc's mmap threshold: freed blocks stay in the heap
    freed = [bytearray(block) for _ in range(1600)]  # 100 MB, as a long batch's activations
    pin = bytearray(block)  # above them in the heap, so freeing them does not trim the heap
    del freed
    clock, control = _StepClock(3), TrainerControl()
    rss = _rss_mb()
    clock.callback.on_step_begin(None, None, control)
    kept = [bytearray(block) for _ in range(800)]  # 50 MB kept for the new shape, in the freed memory
    clock.callback.on_step_end(None, None, control)
    assert _rss_mb() - rss < 10  # what RSS sees of it
    for _ in range(2):
        clock.callback.on_step_begin(None, None, control)
        clock.callback.on_step_end(None, None, control)
    held_mb, _ = clock.first_step()
    assert 45 < held_mb < 60
    assert control.should_training_stop and len(kept) and len(pin)


def test_the_epoch_has_as_many_steps_as_the_trainer_takes(planned, gated):
    from tuneflow.planning import epoch_step_lengths

    rows = planned.data.train_rows
    cfg = gated.train.model_copy(update={"gradient_accumulation_steps": 2})
    assert planned.estimates[0].calibration["epoch_steps"] == math.ceil(rows / gated.train.batch_size)
    lengths = epoch_step_lengths([10] * rows, cfg)
    assert len(lengths) == math.ceil(math.ceil(rows / cfg.batch_size) / 2) and set(lengths) == {10}


def test_plan_command_ingests_and_writes_plan_json_and_a_table(workdir, tiny_model, capsys):
    from cli.main import main

    topic_frame(20).to_csv(workdir / "data.csv", index=False)
    write_params(workdir, data={"source": "data.csv"}, model={"base": str(tiny_model), "max_length": 32}, train=TINY)
    code = main(["plan", "--methods", "lora,ia3", "--steps", "1", "--memory-limit-mb", "100000"])
    out = capsys.readouterr().out
    assert code == 0
    written = json.loads((workdir / "artifacts" / artifacts.PLAN / artifacts.PLAN_JSON).read_text())
    assert [row["method"] for row in written["estimates"]] == ["lora", "ia3"]
    assert written["recommendation"]["method"] in ("lora", "ia3") and written["memory_limit_mb"] == 100000
    assert (workdir / "artifacts" / artifacts.DATA / artifacts.DATA_CARD).is_file()  # ingest ran through the runner
    assert "| lora" in out and "Recommended:" in out


@pytest.mark.parametrize("args, fragment", [
    (["--methods", "lora,nope"], "--methods: unknown method(s) nope"),
    (["--memory-limit-mb", "-3"], "--memory-limit-mb '-3': expected a positive number"),
    (["--time-budget-s", "soon"], "--time-budget-s 'soon': expected a positive number"),
    (["--steps", "0"], "--steps '0': expected a positive integer"),
    (["--set", "train.batch_size=0"], "invalid value for 'train.batch_size'"),
    (["--pipeline", "nowhere"], "unknown pipeline 'nowhere'"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, args, fragment):
    from cli.main import main

    (workdir / "pipelines.yaml").write_text("pipelines:\n  quick:\n    method: lora\n")
    assert main(["plan", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuneflow: error:") and fragment in lines[0], lines
    assert not (workdir / "artifacts").exists()


def test_the_planner_imports_no_orchestrator_or_tracker():
    code = "import sys, tuneflow.planning; print(sorted({'prefect', 'mlflow', 'tasks'} & {m.split('.')[0] for m in sys.modules}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
