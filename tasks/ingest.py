"""Stage 1 — ingest: read a source, clean it, drop repeated rows, split it by a stable hash of each text.

Writes {train,validation,test}.parquet (columns `text`, `label` and any `data.slice_columns`), data_card.json
and report.md into its output folder (artifacts/data/).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.model_selection import train_test_split

from tuneflow.artifacts import DATA_CARD, REPORT, split_file, write_json
from tuneflow.config import DataConfig
from tuneflow.data import SPLITS, builtin_folder, splits_hash
from tuneflow.errors import InputError
from tuneflow.text import fold, split_position

TABULAR_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
MISSING = {"", "nan", "NaN", "NA", "N/A", "null", "NULL", "None"}
MIN_ROWS_PER_CLASS = 3  # one for each split


@dataclass
class Cleaning:
    """What was cleaned on the way in; it goes into the data card."""

    bom_removed: bool = False
    crlf_line_endings: bool = False
    labels_whitespace_stripped: int = 0
    quotes_unwrapped: int = 0
    rows_with_invalid_bytes_replaced: int = 0
    invalid_bytes_examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IngestResult:
    data_dir: Path
    counts: dict[str, int]
    labels: list[str]
    data_hash: str
    card: dict[str, Any]


def ingest(cfg: DataConfig, out_dir: Path) -> IngestResult:
    """Read `cfg.source`, clean, dedup, sample, split; write the splits, the data card and a report into `out_dir`."""
    cleaning = Cleaning()
    raw, source_format = read_source(cfg, cleaning)
    origin = cfg.source
    rows_read = len(raw)
    if rows_read == 0:
        raise InputError(f"{origin}: no rows after loading (data.source)")

    texts = [None if _is_null(value) or not str(value).strip() else str(value).strip() for value in raw["text"]]
    raw_labels = [None if _is_missing(value) else _label_str(value) for value in raw["label"]]
    labels = [value.strip() or None if value is not None else None for value in raw_labels]
    cleaning.labels_whitespace_stripped = sum(1 for before, after in zip(raw_labels, labels) if after and before != after)
    empty_text = pd.Series([text is None for text in texts])
    empty_label = pd.Series([label is None for label in labels])
    if empty_label.all():
        raise InputError(f"{origin}: label column {cfg.label_column!r} has no usable value (data.label_column)")
    if empty_text.all():
        raise InputError(f"{origin}: text column {cfg.text_column!r} has no usable value (data.text_column)")
    invalid = empty_text | empty_label
    invalid_fraction = float(invalid.mean())
    if invalid_fraction > cfg.max_invalid_fraction:
        raise InputError(
            f"{origin}: {int(invalid.sum())} of {rows_read} rows have an empty text or label "
            f"({invalid_fraction:.1%} > data.max_invalid_fraction={cfg.max_invalid_fraction})"
        )
    keep = ~invalid.to_numpy()
    frame = pd.DataFrame({"text": texts, "label": labels,
                          **{column: raw[column].map(slice_value).to_numpy() for column in cfg.slice_columns}}, dtype=str)[keep]
    frame = frame.reset_index(drop=True)

    duplicates_dropped = 0
    if cfg.dedup:
        # Same folded text AND same label: a true repeat. Same text with another label stays for the gate.
        repeated = frame.assign(key=frame["text"].map(fold)).duplicated(subset=["key", "label"], keep="first")
        duplicates_dropped = int(repeated.sum())
        frame = frame[~repeated].reset_index(drop=True)

    class_counts = frame["label"].value_counts()
    if len(class_counts) < 2:
        raise InputError(f"{origin}: only one class ({class_counts.index[0]!r}) in column {cfg.label_column!r}; need at least 2")
    sampled_out = 0
    if cfg.sample is not None and cfg.sample < len(frame):
        if cfg.sample < MIN_ROWS_PER_CLASS * len(class_counts):
            raise InputError(f"data.sample={cfg.sample} is too small for {len(class_counts)} classes (need ≥ {MIN_ROWS_PER_CLASS} per class)")
        sampled_out = len(frame) - cfg.sample
        frame, _ = train_test_split(frame, train_size=cfg.sample, stratify=frame["label"], random_state=cfg.seed)
        class_counts = frame["label"].value_counts()
    rare = class_counts[class_counts < MIN_ROWS_PER_CLASS]
    if len(rare):
        listed = ", ".join(f"{label!r} ({count})" for label, count in rare.items())
        raise InputError(f"{origin}: labels with fewer than {MIN_ROWS_PER_CLASS} rows cannot be split: {listed} (data.label_column)")

    splits = split(frame, cfg)
    label_names = sorted(frame["label"].unique().tolist())
    data_hash = splits_hash(splits)
    card = {
        "source": cfg.source,
        "format": source_format,
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "rows_read": rows_read,
        "rows_kept": int(sum(len(part) for part in splits.values())),
        "dropped": {
            "empty_text": int(empty_text.sum()),
            "empty_label": int((empty_label & ~empty_text).sum()),
            "duplicates": duplicates_dropped,
            "sampled_out": sampled_out,
        },
        "cleaning": cleaning.__dict__,
        "labels": label_names,
        "counts": {name: len(part) for name, part in splits.items()},
        "class_counts": {name: part["label"].value_counts().sort_index().to_dict() for name, part in splits.items()},
        "split": split_record(cfg),
        "slice_columns": list(cfg.slice_columns),
        "dedup": cfg.dedup,
        "data_hash": data_hash,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        part.to_parquet(out_dir / split_file(name), index=False)
    write_json(out_dir / DATA_CARD, card)
    (out_dir / REPORT).write_text(render_report(card), encoding="utf-8")
    return IngestResult(out_dir, card["counts"], label_names, data_hash, card)


def render_report(card: dict[str, Any]) -> str:
    dropped = card["dropped"]
    lines = [f"# Ingest: {card['source']}", "", f"format {card['format']}, data hash `{card['data_hash']}`", "",
             "| item | rows |", "|---|---|", f"| read | {card['rows_read']} |",
             *(f"| dropped: {reason.replace('_', ' ')} | {count} |" for reason, count in dropped.items()),
             *(f"| {split} | {count} |" for split, count in card["counts"].items()),
             "", "| class | " + " | ".join(card["counts"]) + " |", "|---|" + "---|" * len(card["counts"])]
    lines += [f"| {label} | " + " | ".join(str(card["class_counts"][split].get(label, 0)) for split in card["counts"]) + " |"
              for label in card["labels"]]
    return "\n".join(lines) + "\n"


def split(frame: pd.DataFrame, cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """Stable split: a row's position in [0, 1) is a hash of its folded text and `data.split_salt`; test takes
    [0, test_fraction), validation the next validation_fraction, train the rest. A row keeps its split as the
    data grows, and repeats of a text share one split. Every class is cut at the same thresholds, so each is
    stratified in expectation (binomial spread: a class of n rows gets about n·f ± √(n·f·(1−f)) test rows)."""
    position = frame["text"].map(lambda text: split_position(text, cfg.split_salt))
    ordered = frame.assign(position=position).sort_values("position", kind="stable")  # row order independent of the file's
    test = ordered["position"] < cfg.test_fraction
    validation = ~test & (ordered["position"] < cfg.test_fraction + cfg.validation_fraction)
    parts = (ordered[~test & ~validation], ordered[validation], ordered[test])
    return {name: part.drop(columns="position").reset_index(drop=True) for name, part in zip(SPLITS, parts)}


def split_record(cfg: DataConfig) -> dict[str, Any]:
    """What decides which rows a split holds: two models are comparable on one test split only if these match."""
    return {"method": "hash", "salt": cfg.split_salt, "validation_fraction": cfg.validation_fraction,
            "test_fraction": cfg.test_fraction}


def slice_value(value: Any) -> str:
    return "(missing)" if _is_missing(value) else _label_str(value).strip()


# --- reading sources -------------------------------------------------------------------------


def read_source(cfg: DataConfig, cleaning: Cleaning) -> tuple[pd.DataFrame, str]:
    """Return a frame with columns `text` and `label` (raw values) and the format name."""
    source = cfg.source
    with builtin_folder(source) as folder:
        if folder is not None:
            return read_folder(folder, cfg, cleaning), f"folder ({source})"
    if source.startswith("hf:"):
        return read_hub(source.removeprefix("hf:"), cfg), "hf"
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: file not found (data.source)")
    if path.is_dir():
        return read_folder(path, cfg, cleaning), "folder"
    file_format = TABULAR_FORMATS.get(path.suffix.lower())
    if file_format is None:
        supported = ", ".join(sorted(TABULAR_FORMATS))
        raise InputError(f"{path}: unsupported file type {path.suffix or '(none)'!r} (data.source); use one of {supported} or a folder")
    if file_format == "parquet":
        try:
            table = pd.read_parquet(path)
        except Exception as error:  # pyarrow raises several types for a broken file
            raise InputError(f"{path}: cannot read as Parquet ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    else:
        content = decode_file(path, cfg, cleaning)
        table = read_jsonl(path, content) if file_format == "jsonl" else read_delimited(path, content, file_format, cfg, cleaning)
    return pick_columns(table, path, cfg), file_format


def decode_file(path: Path, cfg: DataConfig, cleaning: Cleaning) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise InputError(f"{path}: looks binary (NUL bytes), not a {cfg.encoding} text file (data.source)")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        cleaning.bom_removed = True
    lines = raw.split(b"\n")
    decoded = [decode(line, f"{path.name}:{number}", cfg.encoding, cleaning) for number, line in enumerate(lines, start=1)]
    if cleaning.rows_with_invalid_bytes_replaced > cfg.max_invalid_fraction * max(len(lines), 1):
        raise InputError(
            f"{path}: {cleaning.rows_with_invalid_bytes_replaced} of {len(lines)} lines are not valid {cfg.encoding} "
            f"(first at {cleaning.invalid_bytes_examples[0]}); re-encode the file or set data.encoding"
        )
    text = "\n".join(decoded)
    if "\r\n" in text:
        cleaning.crlf_line_endings = True
        text = text.replace("\r\n", "\n")
    return text


def decode(raw: bytes, where: str, encoding: str, cleaning: Cleaning) -> str:
    """Strict decode; on failure replace the bad bytes and count the row (the caller enforces the limit)."""
    try:
        return raw.decode(encoding)
    except LookupError:
        raise InputError(f"data.encoding: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as error:
        cleaning.rows_with_invalid_bytes_replaced += 1
        if len(cleaning.invalid_bytes_examples) < 5:
            cleaning.invalid_bytes_examples.append(f"{where} byte {error.start}")
        return raw.decode(encoding, errors="replace")


def read_delimited(path: Path, content: str, file_format: str, cfg: DataConfig, cleaning: Cleaning) -> pd.DataFrame:
    headerless = isinstance(cfg.text_column, int) and isinstance(cfg.label_column, int)
    options: dict[str, Any] = dict(dtype=str, keep_default_na=False, header=None if headerless else 0, skip_blank_lines=True)
    if file_format == "tsv":
        # TSV fields are not quoted by convention: a stray " inside a text must not swallow the next rows.
        options.update(sep="\t", quoting=csv.QUOTE_NONE)
    try:
        table = pd.read_csv(io.StringIO(content), **options)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: no rows after loading (data.source)") from None
    except (pd.errors.ParserError, csv.Error) as error:
        raise InputError(f"{path}: cannot parse as {file_format.upper()} ({str(error).strip().splitlines()[-1]})") from None
    if file_format == "tsv":
        for column in table.columns:
            values = table[column]
            quoted = values.str.len().ge(2) & values.str.startswith('"') & values.str.endswith('"')
            cleaning.quotes_unwrapped += int(quoted.sum())
            table.loc[quoted, column] = values[quoted].str.slice(1, -1).str.replace('""', '"', regex=False)
    table.columns = [str(column).strip() if isinstance(column, str) else column for column in table.columns]
    return table


def read_jsonl(path: Path, content: str) -> pd.DataFrame:
    records = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object per line")
        records.append(record)
    return pd.DataFrame.from_records(records)


def pick_columns(table: pd.DataFrame, path: Path, cfg: DataConfig) -> pd.DataFrame:
    picked = {}
    for column in cfg.slice_columns:
        if column not in table.columns:
            found = ", ".join(map(str, table.columns)) or "(none)"
            raise InputError(f"{path}: slice column {column!r} not found (data.slice_columns); columns found: {found}")
        picked[column] = table[column]
    for role, column in (("text", cfg.text_column), ("label", cfg.label_column)):
        key = f"data.{role}_column"
        if isinstance(column, int):
            if not 0 <= column < table.shape[1]:
                raise InputError(f"{path}: {role} column index {column} out of range ({key}); the file has {table.shape[1]} columns")
            picked[role] = table.iloc[:, column]
        elif column in table.columns:
            picked[role] = table[column]
        else:
            found = ", ".join(map(str, table.columns)) or "(none)"
            raise InputError(f"{path}: {role} column {column!r} not found ({key}); columns found: {found}")
    return pd.DataFrame(picked)


def read_folder(folder: Path, cfg: DataConfig, cleaning: Cleaning) -> pd.DataFrame:
    """One sub-folder per class, one `.txt` file per example."""
    if cfg.slice_columns:
        raise InputError(f"{folder}: a folder source has no columns to slice by (data.slice_columns={cfg.slice_columns})")
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.glob("*.txt")):
            text = decode(file.read_bytes(), f"{class_dir.name}/{file.name}", cfg.encoding, cleaning)
            if text.startswith("\ufeff"):
                text = text[1:]
                cleaning.bom_removed = True
            rows.append({"text": text, "label": class_dir.name})
    if not rows:
        raise InputError(f"{folder}: no .txt files in class sub-folders (data.source)")
    if cleaning.rows_with_invalid_bytes_replaced > cfg.max_invalid_fraction * len(rows):
        raise InputError(f"{folder}: {cleaning.rows_with_invalid_bytes_replaced} files are not valid {cfg.encoding}; set data.encoding")
    return pd.DataFrame(rows)


def read_hub(name: str, cfg: DataConfig) -> pd.DataFrame:
    """`hf:<name>` through `datasets.load_dataset` (machines that reach a hub); all splits are pooled."""
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # hub, network and format errors all land here
        raise InputError(f"hf:{name}: cannot load dataset ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    parts = []
    for part in loaded.values():
        frame = part.to_pandas()
        label_feature = part.features.get(cfg.label_column) if isinstance(cfg.label_column, str) else None
        if isinstance(label_feature, datasets.ClassLabel):
            frame[cfg.label_column] = frame[cfg.label_column].map(label_feature.int2str)
        parts.append(frame)
    return pick_columns(pd.concat(parts, ignore_index=True), Path(f"hf:{name}"), cfg)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _is_missing(value: Any) -> bool:
    return _is_null(value) or (isinstance(value, str) and value.strip() in MISSING)


def _label_str(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
