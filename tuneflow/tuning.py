"""Hyperparameter search, the Optuna side: `tune.space` as trial suggestions, the seeded TPE sampler, the pruner,
the resumable storage, the Trainer callback that reports each evaluation to its trial, and the overlay file the
best trial becomes. The study loop itself is a driver (flows/tune.py): it runs the train stage."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tuneflow.config import Params, SearchDimension, TuneConfig, with_overrides
from tuneflow.errors import InputError

if TYPE_CHECKING:
    import optuna


def method_space(params: Params) -> dict[str, SearchDimension]:
    """The search space of the configured train.method (one line naming the key when there is none)."""
    method = params.train.method
    space = params.tune.space.get(method)
    if not space:
        declared = ", ".join(params.tune.space) or "none"
        raise InputError(f"tune.space.{method}: no search space for train.method={method} (declared: {declared}); "
                         f"add e.g. tune.space.{method}: {{train.learning_rate: {{low: 1e-4, high: 3e-3, log: true}}}}")
    return space


def is_integer_range(dimension: SearchDimension) -> bool:
    bounds = (dimension.low, dimension.high, dimension.step if dimension.step is not None else 1)
    return all(isinstance(bound, int) and not isinstance(bound, bool) for bound in bounds)


def check_space(params: Params, space: dict[str, SearchDimension]) -> None:
    """Every bound and choice is a valid value of its key: a bad space fails before the first trial trains."""
    origin = f"tune.space.{params.train.method}"
    for key, dimension in space.items():
        for value in dimension.choices if dimension.choices is not None else (dimension.low, dimension.high):
            with_overrides(params, origin, {key: value})


def suggest(trial: "optuna.Trial", space: dict[str, SearchDimension]) -> dict[str, Any]:
    """One value per searched key, drawn by the study's sampler."""
    values: dict[str, Any] = {}
    for key, dimension in space.items():
        if dimension.choices is not None:
            values[key] = trial.suggest_categorical(key, dimension.choices)
        elif is_integer_range(dimension):
            values[key] = trial.suggest_int(key, dimension.low, dimension.high, step=dimension.step or 1, log=dimension.log)
        else:
            values[key] = trial.suggest_float(key, dimension.low, dimension.high, step=dimension.step, log=dimension.log)
    return values


def configured_values(params: Params, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """The configured value of each searched key that lies in its dimension: trial 0 when tune.include_defaults."""
    dumped = params.model_dump(mode="json")
    values: dict[str, Any] = {}
    for key, dimension in space.items():
        value: Any = dumped
        for part in key.split("."):
            value = value[part]
        inside = (value in dimension.choices if dimension.choices is not None
                  else isinstance(value, (int, float)) and dimension.low <= value <= dimension.high)
        if inside:
            values[key] = value
    return values


def study_name(params: Params, data_hash: str) -> str:
    """The method and a hash of what a trial's result depends on: the data, the model and train sections (the
    searched keys' starting values included), the space, the metric and the seed. Another configuration is another
    study; n_trials, timeout and the pruner are not in it, so raising n_trials and rerunning extends a study."""
    if params.tune.study_name:
        return params.tune.study_name
    dumped = params.model_dump(mode="json")
    payload = {"data": data_hash, "model": dumped["model"], "train": dumped["train"],
               "space": dumped["tune"]["space"][params.train.method], "metric": params.tune.metric, "seed": params.tune.seed}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    return f"{params.train.method}-{digest}"


def sampler(cfg: TuneConfig) -> "optuna.samplers.BaseSampler":
    import optuna

    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials)


def pruner(cfg: TuneConfig) -> "optuna.pruners.BasePruner":
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=cfg.pruner_warmup_epochs)
    if cfg.pruner == "successive_halving":  # rungs at 1, N, N^2 ... evaluations (epochs)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=cfg.reduction_factor)
    return optuna.pruners.NopPruner()


def storage(url: str, cfg: TuneConfig) -> "optuna.storages.RDBStorage":
    """An RDB storage whose running trials beat a heartbeat: a trial whose process was killed is failed once its
    heartbeat is 2x heartbeat_s old, and RetryHeartbeatStaleTrialCallback queues it again with the same values (and
    its reported evaluations)."""
    import warnings

    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental" since 2.9

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # the heartbeat thread writes too
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=cfg.heartbeat_s, grace_period=2 * cfg.heartbeat_s,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=cfg.max_retries,
                                                                            inherit_intermediate_values=True))
    except Exception as error:  # SQLAlchemy's URL and connection errors: one line naming the key
        raise InputError(f"tune.storage: cannot open {url!r} ({type(error).__name__}: {str(error).splitlines()[0]})") from None


def report_callback(trial: "optuna.Trial", metric: str):
    """A TrainerCallback that reports the validation `metric` of every evaluation (one per epoch) to `trial` and stops
    the trial when the pruner says so (optuna.TrialPruned, as transformers' own hyperparameter_search does)."""
    import optuna
    from transformers import TrainerCallback

    class ReportToTrial(TrainerCallback):
        def __init__(self) -> None:
            self.reported: dict[int, float] = {}

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            # the step is the epoch number, so that trials with other batch sizes compare at the same point
            epoch = max(1, math.ceil(round(state.epoch, 6)))
            value = float(metrics[f"eval_{metric}"])
            self.reported[epoch] = value
            trial.report(value, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation {metric} {value:.4f} at epoch {epoch}")

    return ReportToTrial()


def write_overlay(path: Path, name: str, pipeline: dict[str, Any], header: str) -> None:
    """Put one pipeline into the generated overlay file (other pipelines in it are kept); the file is tuneflow's,
    so pipelines.yaml keeps its comments."""
    from tuneflow.config import read_pipelines_file

    existing = read_pipelines_file(path).model_dump(mode="json", exclude_defaults=True) if path.exists() else {}
    pipelines = existing.get("pipelines", {})
    pipelines[name] = pipeline
    path.write_text(header + yaml.safe_dump({"pipelines": pipelines}, sort_keys=False, allow_unicode=True), encoding="utf-8")
