"""`tuneflow plan`: before anything trains, what each fine-tuning method would cost on this data and this machine.

For every method in the method table the planner builds the model the train stage builds, runs a few real optimizer
steps through the train stage's own Trainer on batches of the real data (real batch size and max_length, timed), one
evaluation pass and one save, and extrapolates:

- trainable parameters: counted on the built model (what train_summary.json reports);
- time per epoch: a line `seconds per step = a + b · padded length` fitted to the timed steps, summed over the
  batches the Trainer's own sampler forms from this data's token lengths (length grouping or not), plus the
  validation pass, checkpoint saves and the Trainer's start-up, divided by the epochs (nothing per new batch shape:
  within one training run a padded length met for the first time costs ≤ 0.03 s more than one met before);
- peak memory: the process's resident memory before any model is built, plus the peak the method added during its
  calibration (VmHWM, reset per method), plus the encoded data set (measured on a sample), plus, for every batch
  shape the epoch meets beyond the calibration's, what the C allocator keeps held after a step at a new padded length
  (held bytes, not RSS: those allocations land in memory the longest batch freed, where RSS does not see them, and
  the next long batch then has to grow the heap); on a GPU, the peak the CUDA allocator reserved;
- artifact size: the weight files the method's save writes (saved for real, then measured);
- expected quality: the measured test macro-F1 of every method in the comparison table (tuneflow/methods.py,
  QUALITY_TABLES) whose training-set size is nearest to this data's, and its ratio to the best method there.

Recommendation rule (RULE): among the methods that fit the memory limit (default: this machine's available memory)
and the time budget (default: none), the best expected macro-F1; methods within QUALITY_TOLERANCE of it count as
equal (that is the seed-to-seed spread measured on MR), and of those the fastest is recommended.

The training functions come in as `TrainHooks` (the driver passes tasks/train.py's), so the core imports no stage.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from tuneflow import progress
from tuneflow.config import Params
from tuneflow.errors import InputError, TuneflowError, first_line
from tuneflow.methods import METHODS, QUALITY_TABLES, Method, RunInfo

QUALITY_TOLERANCE = 0.005  # macro-F1: sd of LoRA's MR test accuracy over training seeds (RESULTS.md, 2026-11-24 10:25)
RULE = ("best expected macro-F1 among the methods that fit the memory limit and the time budget; methods within "
        f"{QUALITY_TOLERANCE} of it count as equal, and of those the fastest wins")
CALIBRATION_STEPS = 3  # timed optimizer steps per method and padded length, after one warm-up step
MB = 2**20


class TrainHooks(Protocol):
    """The train stage's functions the calibration runs (tasks/train.py), so it trains exactly as train does."""

    def build_model(self, method: Method, model_cfg, cfg, labels: list[str], run: RunInfo, max_length: int): ...
    def build_trainer(self, model, method: Method, cfg, tokenizer, train_set, validation_set, labels: list[str],
                      run_dir: Path, total_steps: int, bf16: bool): ...
    def encode(self, tokenizer, frame, label_ids: dict[str, int], max_length: int) -> list[dict[str, Any]]: ...
    def pick_max_length(self, model_cfg, cfg, method: Method, tokenizer, texts: list[str]) -> tuple[int, str]: ...
    def use_bf16(self, setting) -> bool: ...


# --- the inputs: this machine and this data ------------------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    cores: int
    torch_threads: int
    memory_total_mb: float
    memory_available_mb: float
    gpu: str | None
    gpu_memory_mb: float | None

    @property
    def device(self) -> str:
        return self.gpu or f"CPU ({self.cores} cores, {self.torch_threads} torch threads)"


def this_machine() -> Machine:
    import psutil
    import torch

    memory = psutil.virtual_memory()
    gpu, gpu_memory = None, None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        gpu, gpu_memory = properties.name, properties.total_memory / MB
    return Machine(os.cpu_count() or 1, torch.get_num_threads(), round(memory.total / MB), round(memory.available / MB),
                   gpu, gpu_memory and round(gpu_memory))


@dataclass(frozen=True)
class DataProfile:
    source: str
    data_hash: str
    train_rows: int
    validation_rows: int
    classes: int
    class_counts: dict[str, int]
    token_lengths: dict[str, float]  # untruncated, of the training texts: p50/p90/p99/max/mean


def length_profile(lengths: list[int]) -> dict[str, float]:
    values = np.asarray(lengths)
    return {"p50": float(np.percentile(values, 50)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "max": float(values.max()), "mean": round(float(values.mean()), 1)}


def batch_lengths(lengths: list[int], batch_size: int, group_by_length: bool, seed: int) -> list[int]:
    """The padded length of every batch of one epoch, from the sampler the Trainer uses (dynamic padding pads each
    batch to its longest row)."""
    import torch
    from torch.utils.data import RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    sampler = (LengthGroupedSampler(batch_size, lengths=lengths, generator=generator) if group_by_length
               else RandomSampler(range(len(lengths)), generator=generator))
    order = list(sampler)
    return [max(lengths[index] for index in order[start:start + batch_size]) for start in range(0, len(order), batch_size)]


# --- calibration: a few real steps per method ----------------------------------------------------------------------

@dataclass
class Calibration:
    trainable_params: int
    total_params: int
    points: list[tuple[float, float]]  # (padded length, median seconds per optimizer step), shortest first
    timings: dict[int, list[float]]  # every timed step's seconds, by padded length (warm-up steps left out)
    setup_s: float  # trainer.train() until the first step starts: optimizer, data loader
    eval_s_per_row: float
    save_s: float
    weights_bytes: int
    peak_added_mb: float  # resident memory the method added at its peak (VmHWM minus RSS before building it)
    gpu_peak_mb: float | None
    new_shape_mb: float = 0.0  # memory the allocator keeps held after the first step at a padded length not met before
    new_shape_s: float = 0.0  # and that first step's seconds beyond the others' median (recorded, not extrapolated)


class _StepClock:
    """A Trainer callback: the time and the allocator's held memory at each optimizer step's start and end; it stops
    training after `steps` steps without evaluating or saving (the calibration's evaluation and save are timed apart)."""

    def __init__(self, steps: int):
        from transformers import TrainerCallback

        self.wanted = steps
        self.reset()
        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                clock.begins.append((time.perf_counter(), _held_mb()))

            def on_step_end(self, args, state, control, **kwargs):
                clock.ends.append((time.perf_counter(), _held_mb()))
                control.should_save = control.should_evaluate = False
                control.should_training_stop = len(clock.ends) >= clock.wanted

            def on_epoch_end(self, args, state, control, **kwargs):
                control.should_save = control.should_evaluate = False

        self.callback = Callback()

    def reset(self) -> None:
        self.begins: list[tuple[float, float]] = []
        self.ends: list[tuple[float, float]] = []

    def seconds(self) -> np.ndarray:
        return np.array([end[0] for end in self.ends]) - np.array([begin[0] for begin in self.begins])

    def first_step(self) -> tuple[float, float]:
        """The memory the first step left held (MB), and its seconds beyond the median of the steps after it."""
        seconds = self.seconds()
        return self.ends[0][1] - self.begins[0][1], max(0.0, float(seconds[0] - np.median(seconds[1:])))


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _mallinfo2():
    """glibc's mallinfo2, looked up once; None where the C library has none."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError, TypeError):
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2


def _held_mb() -> float:
    """Memory the C allocator has handed out and not had back (glibc's mallinfo2, all arenas: heap blocks in use plus
    mmapped blocks); RSS where that is not available. Unlike RSS it grows when an allocation reuses freed memory."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is None:
        return _rss_mb()
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / MB


def _reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return _rss_mb()


def rows_of_length(train_set: list[dict], length: int, count: int) -> list[dict]:
    """`count` training rows cut to exactly `length` tokens (rows at least that long, repeated when too few): every
    batch the Trainer forms from them pads to `length`, whatever order its sampler picks."""
    long_enough = [row for row in train_set if len(row["input_ids"]) >= length]
    return [{key: value[:length] if isinstance(value, list) else value for key, value in long_enough[index % len(long_enough)].items()}
            for index in range(count)]


def calibrate(method: Method, params: Params, hooks: TrainHooks, tokenizer, labels: list[str], train_set: list[dict],
              validation_set: list[dict], total_steps: int, bf16: bool, steps: int, max_length: int,
              lengths: tuple[int, ...]) -> Calibration:
    """Build `method`'s model and train it with the train stage's Trainer for 1 + `steps` steps at each padded length
    in `lengths` (longest first: its warm-up step is the memory peak), then one evaluation pass and one save."""
    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cfg, gpu = params.train, torch.cuda.is_available()
    rows_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    eval_rows = min(len(validation_set), 2 * cfg.eval_batch_size)
    picked = np.random.default_rng(cfg.seed).choice(len(validation_set), size=eval_rows, replace=False)
    eval_subset = [validation_set[index] for index in picked]

    gc.collect()
    before = _rss_mb()
    exact_peak = _reset_peak()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = hooks.build_model(method, params.model, cfg, labels, RunInfo(total_steps, bf16), max_length)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    points, timings, setup_s, new_shape = [], {}, 0.0, None
    ordered = sorted(set(lengths), reverse=True)
    with tempfile.TemporaryDirectory(prefix="tuneflow-plan-") as scratch:
        trainer = hooks.build_trainer(model, method, cfg, tokenizer, rows_of_length(train_set, ordered[0], rows_per_step),
                                      eval_subset, labels, Path(scratch) / "run", total_steps, bf16)
        trainer.args.max_steps = 1 + steps  # whatever train.epochs says: each subset holds exactly these steps
        clock = _StepClock(1 + steps)
        trainer.add_callback(clock.callback)
        for quiet in (ProgressCallback, PrinterCallback):  # no progress bars or loss lines from calibration
            trainer.remove_callback(quiet)
        for length in ordered:
            # the same Trainer (and optimizer state) for every length, as one training run keeps them
            trainer.train_dataset = rows_of_length(train_set, length, (1 + steps) * rows_per_step)
            clock.reset()
            called = time.perf_counter()
            trainer.train()
            setup_s = setup_s or clock.begins[0][0] - called
            seconds = clock.seconds()
            timings[length] = [round(value, 4) for value in seconds.tolist()]
            points.append((float(length), float(np.median(seconds[1:]))))  # the median: other processes share the cores
            if points[1:]:
                # a padded length met for the first time keeps memory held for that shape (measured on MiniLM, bf16
                # CPU: 3-11 MB a shape, none for a length met before); the longest length's first step also holds
                # the optimizer's first allocation, so the second length's first step is the one measured
                new_shape = clock.first_step()
        started = time.perf_counter()
        trainer.evaluate()
        eval_s = time.perf_counter() - started
        final = Path(scratch) / "final"
        started = time.perf_counter()
        if method.save is None:
            trainer.save_model(str(final))
        else:
            method.save(trainer.model, final)
        save_s = time.perf_counter() - started
        weights = sum(path.stat().st_size for path in final.glob("*.safetensors"))
    peak_added = (_peak_mb() if exact_peak else _rss_mb()) - before
    gpu_peak = torch.cuda.max_memory_reserved() / MB if gpu else None
    del trainer, model
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return Calibration(trainable, total, sorted(points), timings, setup_s=setup_s, eval_s_per_row=eval_s / max(1, eval_rows),
                       save_s=save_s, weights_bytes=weights, peak_added_mb=max(0.0, peak_added), gpu_peak_mb=gpu_peak,
                       new_shape_mb=max(0.0, new_shape[0]) if new_shape else 0.0,
                       new_shape_s=new_shape[1] if new_shape else 0.0)


def step_seconds(calibration: Calibration) -> Callable[[float], float]:
    """Seconds per optimizer step as a function of the padded length: the line through the measured (length, median
    seconds) points, flat where there is one point or where noise makes it fall with length."""
    (short, short_s), (long, long_s) = calibration.points[0], calibration.points[-1]
    if long == short or long_s <= short_s:
        mean = float(np.mean([seconds for _, seconds in calibration.points]))
        return lambda length: mean
    slope = (long_s - short_s) / (long - short)
    return lambda length: max(short_s + slope * (length - short), short_s * 0.25)


# --- estimates and the recommendation ------------------------------------------------------------------------------

@dataclass
class Estimate:
    method: str
    description: str
    status: str = "ok"  # ok, or why the method cannot train here
    max_length: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    peak_memory_mb: float | None = None
    memory_kind: str = "RSS"
    time_per_epoch_s: float | None = None
    train_time_s: float | None = None
    artifact_mb: float | None = None
    expected_macro_f1: float | None = None
    relative_quality: float | None = None
    fits: bool = False
    excluded_because: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)


def epoch_step_lengths(train_lengths: list[int], cfg) -> list[float]:
    """The padded length of each optimizer step of one epoch (the mean over its accumulated batches)."""
    lengths = batch_lengths(train_lengths, cfg.batch_size, cfg.group_by_length, cfg.seed)
    accumulation = cfg.gradient_accumulation_steps
    return [float(np.mean(lengths[i:i + accumulation])) for i in range(0, len(lengths), accumulation)]


def calibration_lengths(step_lengths: list[float]) -> tuple[int, ...]:
    """The two padded lengths to time: the epoch's longest step and its median one."""
    return int(round(max(step_lengths))), int(round(float(np.median(step_lengths))))


def shapes(train_lengths: list[int], validation_lengths: list[int], cfg) -> int:
    """How many distinct batch shapes one epoch meets: the training batches' padded lengths (the Trainer's sampler)
    and the evaluation batches' (in order, eval_batch_size at a time)."""
    train = set(batch_lengths(train_lengths, cfg.batch_size, cfg.group_by_length, cfg.seed))
    evaluation = {max(validation_lengths[start:start + cfg.eval_batch_size])
                  for start in range(0, len(validation_lengths), cfg.eval_batch_size)}
    return len(train) + len(evaluation)


def estimate(name: str, calibration: Calibration, params: Params, step_lengths: list[float], shape_count: int,
             validation_rows: int, baseline_mb: float, data_mb: float, quality: dict[str, float | None],
             max_length: int) -> Estimate:
    cfg = params.train
    per_step = step_seconds(calibration)
    unseen = max(0, shape_count - len(calibration.points) - 1)  # calibration met its lengths and one evaluation shape
    # the batch shapes the calibration did not meet add memory, not time: in one training run a new padded length
    # costs ≤ 0.03 s more than a seen one; calibration.new_shape_s is one step's wall time (the first of a train()
    # call) minus a median, which on shared cores reached 12 s, and times the ~40 shapes of an epoch would swamp it
    steps_s = sum(per_step(length) for length in step_lengths)
    evaluation_s = calibration.eval_s_per_row * validation_rows
    cadence = cfg.save_steps * steps_s / len(step_lengths) if cfg.save_steps else cfg.save_every_s
    saves = 1 + math.floor(steps_s / cadence)  # the end-of-epoch save, and the cadence's saves within the epoch
    epoch_s = steps_s + evaluation_s + saves * calibration.save_s
    train_s = calibration.setup_s + cfg.epochs * epoch_s
    gpu = calibration.gpu_peak_mb is not None
    peak = calibration.gpu_peak_mb if gpu else baseline_mb + calibration.peak_added_mb + data_mb + unseen * calibration.new_shape_mb
    return Estimate(
        name, METHODS[name].description, max_length=max_length, trainable_params=calibration.trainable_params,
        total_params=calibration.total_params, peak_memory_mb=round(peak, 1), memory_kind="GPU" if gpu else "RSS",
        time_per_epoch_s=round(train_s / cfg.epochs, 2), train_time_s=round(train_s, 2),
        artifact_mb=round(calibration.weights_bytes / MB, 3), expected_macro_f1=quality.get(name),
        calibration={"points": [[length, round(seconds, 4)] for length, seconds in calibration.points],
                     "step_seconds": {str(length): values for length, values in calibration.timings.items()},
                     "setup_s": round(calibration.setup_s, 3), "eval_s_per_row": round(calibration.eval_s_per_row, 5),
                     "save_s": round(calibration.save_s, 3), "peak_added_mb": round(calibration.peak_added_mb, 1),
                     "new_shape_mb": round(calibration.new_shape_mb, 1), "new_shape_s": round(calibration.new_shape_s, 3),
                     "shapes": shape_count, "epoch_steps": len(step_lengths), "epoch_steps_s": round(steps_s, 2),
                     "epoch_eval_s": round(evaluation_s, 2), "saves_per_epoch": saves})


def quality_table(train_rows: int) -> str:
    """The measured comparison whose training-set size is nearest this data's (on a log scale)."""
    return min(QUALITY_TABLES, key=lambda name: abs(math.log(QUALITY_TABLES[name].train_rows / max(1, train_rows))))


def recommend(estimates: list[Estimate], memory_limit_mb: float, time_budget_s: float | None) -> dict[str, Any]:
    """Mark which methods fit, and pick one by RULE (returns the recommendation record; `method` None if none fits)."""
    for row in estimates:
        row.fits, row.excluded_because = False, None
        if row.status != "ok":
            row.excluded_because = row.status
        elif row.peak_memory_mb > memory_limit_mb:
            row.excluded_because = f"peak memory {row.peak_memory_mb:,.0f} MB > limit {memory_limit_mb:,.0f} MB"
        elif time_budget_s is not None and row.train_time_s > time_budget_s:
            row.excluded_because = f"training {row.train_time_s:,.0f} s > budget {time_budget_s:,.0f} s"
        elif row.expected_macro_f1 is None:
            row.excluded_because = "no measured quality for this method"
        else:
            row.fits = True
    fitting = [row for row in estimates if row.fits]
    best_quality = max((row.expected_macro_f1 for row in estimates if row.expected_macro_f1 is not None), default=None)
    for row in estimates:
        if row.expected_macro_f1 is not None and best_quality:
            row.relative_quality = round(row.expected_macro_f1 / best_quality, 4)
    if not fitting:
        return {"method": None, "reason": "no method fits: " + "; ".join(f"{row.method}: {row.excluded_because}" for row in estimates)}
    top = max(row.expected_macro_f1 for row in fitting)
    equal = [row for row in fitting if row.expected_macro_f1 >= top - QUALITY_TOLERANCE]
    chosen = min(equal, key=lambda row: row.train_time_s)
    others = [row for row in equal if row is not chosen]
    reason = (f"expected macro-F1 {chosen.expected_macro_f1:.4f} ({chosen.relative_quality:.1%} of the best measured), "
              f"the best of the {len(fitting)} of {len(estimates)} methods that fit")
    if others:
        reason += " within {:.3f}, and the fastest of them ({})".format(QUALITY_TOLERANCE, ", ".join(
            f"{row.method} {row.expected_macro_f1:.4f} at {row.train_time_s / chosen.train_time_s:.1f}× the time" for row in others))
    reason += (f"; est. {chosen.time_per_epoch_s:,.0f} s per epoch, peak {chosen.peak_memory_mb:,.0f} MB "
               f"of {memory_limit_mb:,.0f} MB, artifact {chosen.artifact_mb:.3g} MB")
    return {"method": chosen.method, "reason": reason}


# --- the whole plan ------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    machine: Machine
    data: DataProfile
    settings: dict[str, Any]
    quality_table: dict[str, Any]
    memory_limit_mb: float
    time_budget_s: float | None
    estimates: list[Estimate]
    recommendation: dict[str, Any]
    rule: str = RULE
    planning_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"machine": asdict(self.machine) | {"device": self.machine.device}}


def encoded_mb(hooks: TrainHooks, tokenizer, frame, label_ids: dict[str, int], max_length: int) -> float:
    """Memory of the encoded rows as train holds them, measured on a sample of up to 1,000 rows and scaled by tokens."""
    sample = frame.iloc[:1000]
    tracemalloc.start()
    encoded = hooks.encode(tokenizer, sample, label_ids, max_length)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    sample_tokens = sum(len(row["input_ids"]) for row in encoded)
    all_tokens = sum(len(ids) for ids in tokenizer(frame["text"].tolist(), truncation=True, max_length=max_length)["input_ids"])
    return held / MB * all_tokens / max(1, sample_tokens)


def plan(params: Params, splits: dict[str, Any], card: dict[str, Any], hooks: TrainHooks, methods: list[str] | None = None,
         memory_limit_mb: float | None = None, time_budget_s: float | None = None,
         steps: int = CALIBRATION_STEPS) -> Plan:
    """Estimate every method (or `methods`) on `splits` (the training and validation frames) and recommend one."""
    import peft  # noqa: F401  -- imported by every training run: in the baseline, not in the first method's peak
    import sklearn.metrics  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from tuneflow.models import load_tokenizer

    started = time.perf_counter()
    names = methods or list(METHODS)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise InputError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if steps < 1:
        raise InputError(f"--steps {steps}: need at least 1 timed step per length")
    cfg = params.train
    machine = this_machine()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    labels = card["labels"]
    label_ids = {label: index for index, label in enumerate(labels)}
    tokenizer = load_tokenizer(params.model)
    train_frame, validation_frame = splits["train"], splits["validation"]
    texts = train_frame["text"].tolist()
    raw_lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    data = DataProfile(card["source"], card["data_hash"], len(train_frame), len(validation_frame), len(labels),
                       {label: int(count) for label, count in train_frame["label"].value_counts().sort_index().items()},
                       length_profile(raw_lengths))
    table_name = quality_table(data.train_rows)
    quality = {name: METHODS[name].measured_macro_f1.get(table_name) for name in names}
    bf16 = hooks.use_bf16(cfg.bf16)
    steps_per_epoch = math.ceil(math.ceil(len(train_frame) / cfg.batch_size) / cfg.gradient_accumulation_steps)
    total_steps = math.ceil(steps_per_epoch * cfg.epochs)
    limit = memory_limit_mb if memory_limit_mb is not None else (
        machine.gpu_memory_mb if machine.gpu else machine.memory_available_mb)

    encoded: dict[int, tuple[list[dict], list[dict], float]] = {}  # by max_length
    max_lengths: dict[int, tuple[int, str]] = {}  # by the method's virtual tokens
    baseline_mb = None
    estimates = []
    for name in names:
        method = METHODS[name]
        row = Estimate(name, method.description)
        try:
            virtual = method.virtual_tokens(cfg)
            if virtual not in max_lengths:
                max_lengths[virtual] = hooks.pick_max_length(params.model, cfg, method, tokenizer, texts)
            max_length = max_lengths[virtual][0]
            if max_length not in encoded:
                train_set = hooks.encode(tokenizer, train_frame, label_ids, max_length)
                validation_set = hooks.encode(tokenizer, validation_frame, label_ids, max_length)
                data_mb = encoded_mb(hooks, tokenizer, train_frame, label_ids, max_length) * (1 + len(validation_frame) / max(1, len(train_frame)))
                encoded[max_length] = (train_set, validation_set, data_mb)
            train_set, validation_set, data_mb = encoded[max_length]
            step_lengths = epoch_step_lengths([len(r["input_ids"]) for r in train_set], cfg)
            lengths = calibration_lengths(step_lengths)
            run = (method, params, hooks, tokenizer, labels, train_set, validation_set, total_steps, bf16)
            if baseline_mb is None:
                # one untimed run first: what every training process loads and allocates once (the Trainer's
                # modules, kernels, thread pools) is then in the baseline for every method alike
                calibrate(*run, 1, max_length, lengths[:1])
                gc.collect()
                baseline_mb = _rss_mb() - sum(entry[2] for entry in encoded.values())
            progress.say(f"[tuneflow] plan: calibrating {name} ({steps} timed steps at padded lengths "
                         f"{' and '.join(map(str, lengths))}, batch {cfg.batch_size})")
            calibration = calibrate(*run, steps, max_length, lengths)
            shape_count = shapes([len(r["input_ids"]) for r in train_set], [len(r["input_ids"]) for r in validation_set], cfg)
            row = estimate(name, calibration, params, step_lengths, shape_count, len(validation_set), baseline_mb, data_mb,
                           quality, max_length)
        except TuneflowError as error:
            row.status = f"cannot train here: {first_line(error)}"
        except (RuntimeError, ValueError, NotImplementedError) as error:  # a library refusing this method on this base/device
            row.status = f"cannot train here: {type(error).__name__}: {first_line(error)}"
        estimates.append(row)
    recommendation = recommend(estimates, limit, time_budget_s)
    table = QUALITY_TABLES[table_name]
    settings = {"base": params.model.base, "batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                "epochs": cfg.epochs, "group_by_length": cfg.group_by_length, "bf16": bf16,
                "max_length": {str(virtual): {"max_length": value, "source": source} for virtual, (value, source) in max_lengths.items()},
                "calibration_steps": steps, "baseline_rss_mb": round(baseline_mb or 0.0, 1)}
    return Plan(machine, data, settings, {"name": table_name, **asdict(table)}, limit, time_budget_s, estimates,
                recommendation, planning_s=round(time.perf_counter() - started, 1))


# --- output -------------------------------------------------------------------------------------------------------

def render(plan_: Plan) -> str:
    """The plan as a readable table (stdout and plan.md)."""
    data, machine, quality = plan_.data, plan_.machine, plan_.quality_table
    lengths = data.token_lengths
    budget = f"{plan_.time_budget_s:,.0f} s" if plan_.time_budget_s is not None else "none"
    lines = [f"# Plan: {plan_.settings['base']} on {data.source}", "",
             f"Data: {data.train_rows:,} training rows, {data.validation_rows:,} validation, {data.classes} classes; "
             f"token lengths p50 {lengths['p50']:g}, p90 {lengths['p90']:g}, p99 {lengths['p99']:g}, max {lengths['max']:g}.",
             f"Machine: {machine.device}, {machine.memory_available_mb:,.0f} of {machine.memory_total_mb:,.0f} MB memory available. "
             f"Settings: {plan_.settings['epochs']:g} epochs, batch {plan_.settings['batch_size']}, bf16 {plan_.settings['bf16']}.",
             f"Limits: memory {plan_.memory_limit_mb:,.0f} MB, time budget {budget}. Expected quality: test macro-F1 measured in "
             f"'{quality['name']}' ({quality['description']}; {quality['where']}).", "",
             "| method | trainable params | max_length | peak memory (MB) | time/epoch (s) | artifact (MB) | expected macro-F1 | relative | fits |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in plan_.estimates:
        if row.status != "ok":
            lines.append(f"| {row.method} | — | — | — | — | — | — | — | {row.status} |")
            continue
        quality_cell = f"{row.expected_macro_f1:.4f}" if row.expected_macro_f1 is not None else "—"
        relative = f"{row.relative_quality:.1%}" if row.relative_quality is not None else "—"
        fits = "yes" if row.fits else f"no: {row.excluded_because}"
        mark = " **←**" if row.method == plan_.recommendation["method"] else ""
        lines.append(f"| {row.method}{mark} | {row.trainable_params:,} | {row.max_length} | {row.peak_memory_mb:,.0f} {row.memory_kind} | "
                     f"{row.time_per_epoch_s:,.1f} | {row.artifact_mb:.3g} | {quality_cell} | {relative} | {fits} |")
    recommendation = plan_.recommendation
    lines += ["", f"**Recommended: {recommendation['method'] or 'none'}** — {recommendation['reason']}.", "",
              f"Rule: {plan_.rule}. Estimates from {plan_.settings['calibration_steps']} timed optimizer steps per method "
              f"at two padded lengths on this machine (planning took {plan_.planning_s:,.0f} s)."]
    return "\n".join(lines) + "\n"
