"""Texts longer than max_length tokens: which token windows the model sees (`model.long_text`) and how their logits
become one row per text. The one place this is decided; training, export parity, evaluation and serving call it.

- truncate: the first max_length tokens (the tokenizer's own truncation).
- head_tail: the first and the last tokens of a text that is too long (Sun et al. 2019, "How to Fine-Tune BERT for
  Text Classification": 128 head + 382 tail of 510); `head_fraction` of the budget from the head, the rest from the tail.
- chunk: windows of max_length tokens that overlap by `chunk_overlap`, the last one ending at the text's end, at most
  `max_chunks` per text (the first ones); a text's logits are the mean of its windows' logits. Training draws one
  window per text per epoch (`SampledWindows`), so an epoch costs what it costs under truncate.

A window always carries the tokenizer's own special tokens ([CLS] … [SEP] for BERT, <s> … </s> for MPNet), taken from
how the tokenizer frames a text, so a text that fits gives the same ids under every policy. The ONNX graph stays one
window per row: `pool` averages in numpy, after the model ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np

from tuneflow.errors import InputError

POLICIES = ("truncate", "head_tail", "chunk")
INPUT_NAMES = ["input_ids", "attention_mask"]  # the ONNX graph's inputs


@dataclass(frozen=True)
class LongText:
    """The policy a model was trained with; it travels in train_summary.json and the export's serving.json."""

    policy: str
    max_length: int
    head_fraction: float = 0.25
    chunk_overlap: int = 0
    max_chunks: int = 1

    @classmethod
    def of(cls, model_cfg: Any, max_length: int) -> "LongText":
        """From the `model` section, at the max_length train chose (which may have been `auto`)."""
        if model_cfg.long_text == "chunk" and model_cfg.chunk_overlap > max_length // 2:
            raise InputError(f"model.chunk_overlap {model_cfg.chunk_overlap} must be at most half of max_length {max_length}")
        return cls(model_cfg.long_text, max_length, model_cfg.head_fraction, model_cfg.chunk_overlap, model_cfg.max_chunks)

    @classmethod
    def from_record(cls, record: dict[str, Any] | None, max_length: int) -> "LongText":
        """From a summary's or serving record's `long_text`; a model recorded before the policy existed truncates."""
        if not record:
            return cls("truncate", max_length)
        return cls(**{**record, "max_length": max_length})

    def record(self) -> dict[str, Any]:
        """What train_summary.json and serving.json hold (max_length is recorded beside it, as before)."""
        return {key: value for key, value in asdict(self).items() if key != "max_length"}

    def describe(self) -> str:
        if self.policy == "head_tail":
            return f"head_tail ({self.head_fraction:g} of the budget from the head, the rest from the tail)"
        if self.policy == "chunk":
            return f"chunk ({self.chunk_overlap} tokens overlap, at most {self.max_chunks} windows per text, logits averaged)"
        return "truncate (the first tokens)"


class Windower:
    """One tokenizer under one policy: texts → windows of token ids (special tokens included) and each window's text."""

    def __init__(self, tokenizer, long_text: LongText):
        self.tokenizer, self.long_text = tokenizer, long_text
        if long_text.policy not in POLICIES:
            raise InputError(f"model.long_text: unknown policy {long_text.policy!r}; choose one of {', '.join(POLICIES)}")
        if long_text.policy != "truncate":
            self.prefix, self.suffix = framing(tokenizer)
            self.budget = long_text.max_length - len(self.prefix) - len(self.suffix)  # content tokens per window
            if long_text.policy == "chunk" and self.budget - long_text.chunk_overlap < 1:
                raise InputError(f"model.chunk_overlap {long_text.chunk_overlap}: windows of {self.budget} content tokens "
                                 f"(max_length {long_text.max_length}) cannot overlap by that much")

    def windows(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        """(the windows' input ids, the index of the text each window belongs to); every text has at least one."""
        if not texts:
            return [], np.empty(0, dtype=np.int64)
        if self.long_text.policy == "truncate":
            ids = self.tokenizer(texts, truncation=True, max_length=self.long_text.max_length)["input_ids"]
            return ids, np.arange(len(texts))
        contents = self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        cut = self.head_tail if self.long_text.policy == "head_tail" else self.chunks
        windows, owner = [], []
        for index, content in enumerate(contents):
            for piece in cut(content):
                windows.append(self.prefix + piece + self.suffix)
                owner.append(index)
        return windows, np.asarray(owner, dtype=np.int64)

    def head_tail(self, content: list[int]) -> list[list[int]]:
        if len(content) <= self.budget:
            return [content]
        head = int(self.budget * self.long_text.head_fraction)
        tail = self.budget - head
        return [content[:head] + content[len(content) - tail:]]

    def chunks(self, content: list[int]) -> list[list[int]]:
        return [content[start : start + self.budget] for start in chunk_starts(len(content), self.budget,
                                                                               self.long_text.chunk_overlap, self.long_text.max_chunks)]

    def encode(self, texts: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The model inputs of all windows of `texts` (padded to the longest) and each window's text index."""
        windows, owner = self.windows(texts)
        return pad(windows, self.tokenizer), owner

    def logits(self, run: Callable[[dict[str, np.ndarray]], np.ndarray], texts: list[str], batch_size: int,
               classes: int) -> np.ndarray:
        """Per-text logits: `run` (one batch of model inputs → float logits) over every window, in batches of windows
        of similar length (little compute goes to padding), then `pool`."""
        windows, owner = self.windows(texts)
        order = np.argsort([len(window) for window in windows], kind="stable")
        logits = np.empty((len(windows), classes), dtype=np.float32)
        for start in range(0, len(windows), batch_size):
            rows = order[start : start + batch_size]
            logits[rows] = run(pad([windows[row] for row in rows], self.tokenizer))
        return pool(logits, owner, len(texts))


def framing(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text, read from its own output
    ([CLS] / [SEP] for BERT, <s> / </s> for MPNet), so windows are framed exactly as `tokenizer(text)` frames a text."""
    encoded = tokenizer("a", return_special_tokens_mask=True)
    ids, special = encoded["input_ids"], encoded["special_tokens_mask"]
    first = special.index(0)
    last = len(special) - 1 - special[::-1].index(0)
    return ids[:first], ids[last + 1:]


def chunk_starts(tokens: int, budget: int, overlap: int, max_chunks: int) -> list[int]:
    """Window starts over `tokens` content tokens: every `budget - overlap` tokens, the last window ending at the end
    (so it may overlap its neighbour by more), the first `max_chunks` of them."""
    if tokens <= budget:
        return [0]
    starts = list(range(0, tokens - budget, budget - overlap)) + [tokens - budget]
    return starts[:max_chunks]


def pad(windows: list[list[int]], tokenizer) -> dict[str, np.ndarray]:
    """int64 input_ids and attention_mask, padded on the tokenizer's side to the longest window (`tokenizer.pad`)."""
    # its "use __call__, it is faster" notice is about padding after encoding text; windows are cut token lists
    tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
    padded = tokenizer.pad({"input_ids": windows}, return_attention_mask=True, return_tensors="np")
    return {key: padded[key].astype(np.int64) for key in ("input_ids", "attention_mask")}


def pool(logits: np.ndarray, owner: np.ndarray, texts: int) -> np.ndarray:
    """The mean of each text's window logits (float32); a text with one window keeps its logits exactly."""
    counts = np.bincount(owner, minlength=texts)
    if (counts == 0).any():
        raise ValueError("every text needs at least one window")
    sums = np.zeros((texts, logits.shape[-1]), dtype=np.float64)
    np.add.at(sums, owner, logits.astype(np.float64))
    return (sums / counts[:, None]).astype(np.float32)


class SampledWindows:
    """Training rows under chunk: one window per text, drawn afresh each epoch (seeded by seed and epoch), so an epoch
    costs what truncate's does and every window of a long text is trained on over the epochs.

    A map-style dataset for the HF Trainer; `EpochDraw` (a TrainerCallback) calls `set_epoch` as each epoch begins."""

    def __init__(self, windows: list[list[int]], owner: np.ndarray, labels: list[int], seed: int):
        self.windows, self.labels, self.seed = windows, labels, seed
        self.counts = np.bincount(owner, minlength=len(labels))
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.choice = self.offsets + np.random.default_rng([self.seed, self.epoch]).integers(0, self.counts)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.labels):
            raise IndexError(index)
        window = self.windows[self.choice[index]]
        return {"input_ids": window, "attention_mask": [1] * len(window), "labels": self.labels[index]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[index] for index in range(len(self)))


def epoch_draw(dataset: SampledWindows):
    """The TrainerCallback that re-draws `dataset`'s windows as each epoch begins (a resumed run draws its epoch's)."""
    import math

    from transformers import TrainerCallback

    class EpochDraw(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            dataset.set_epoch(math.floor(state.epoch + 1e-6))

    return EpochDraw()
