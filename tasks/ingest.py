"""Stage 1 — ingest: read a source, clean it, drop repeated rows, split it by a stable hash of each text.

Writes {train,validation,test}.parquet (columns `text`, `label` and any `data.slice_columns`), data_card.json
and report.md into its output folder (artifacts/data/).

Memory stays near one copy of the kept texts: a file is read CHUNK_ROWS rows at a time and only the needed
columns are kept; texts are held as Arrow strings, while dedup, sampling and splitting work on a small frame of
labels, hashes and split positions; a split's texts are gathered only as it is written.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tuneflow.artifacts import DATA_CARD, REPORT, split_file, write_json
from tuneflow.config import BUILTIN_BBC, DataConfig
from tuneflow.data import SPLITS, builtin_folder, splits_hash
from tuneflow.errors import InputError
from tuneflow.text import fold, split_position, stable_hash

TABULAR_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
MISSING = {"", "nan", "NaN", "NA", "N/A", "null", "NULL", "None"}
MIN_ROWS_PER_CLASS = 3  # one for each split
CHUNK_ROWS = 20_000  # rows read and cleaned at a time
WRITE_ROWS = 20_000  # rows per parquet row group when a split is written
SLICE = "slice:"  # prefix of the slice columns in the frame of kept rows (a slice column may be called `key`)
BOM = b"\xef\xbb\xbf"


@dataclass
class Cleaning:
    """What was cleaned on the way in; it goes into the data card."""

    bom_removed: bool = False
    crlf_line_endings: bool = False
    labels_whitespace_stripped: int = 0
    quotes_unwrapped: int = 0
    rows_with_invalid_bytes_replaced: int = 0
    invalid_bytes_examples: list[str] = field(default_factory=list)


@dataclass
class Tally:
    """Rows read and rows dropped for an empty text or label, summed over the chunks."""

    rows: int = 0
    empty_text: int = 0
    empty_label: int = 0  # label empty, text present
    no_label: int = 0  # label empty, whatever the text


@dataclass(frozen=True)
class IngestResult:
    data_dir: Path
    counts: dict[str, int]
    labels: list[str]
    data_hash: str
    card: dict[str, Any]


def ingest(cfg: DataConfig, out_dir: Path) -> IngestResult:
    """Read `cfg.source`, clean, dedup, sample, split; write the splits, the data card and a report into `out_dir`."""
    cleaning, tally = Cleaning(), Tally()
    categories = {column: Categories() for column in ["label", *(SLICE + column for column in cfg.slice_columns)]}
    source_format, chunks = read_source(cfg, cleaning)
    texts, kept = [], []
    for chunk in chunks:
        chunk_texts, chunk_rows = clean_chunk(chunk, cfg, tally, cleaning, categories)
        texts.append(chunk_texts)
        kept.append(chunk_rows)
    origin = cfg.source
    rows_read = tally.rows
    if rows_read == 0:
        raise InputError(f"{origin}: no rows after loading (data.source)")
    if tally.no_label == rows_read:
        raise InputError(f"{origin}: label column {cfg.label_column!r} has no usable value (data.label_column)")
    if tally.empty_text == rows_read:
        raise InputError(f"{origin}: text column {cfg.text_column!r} has no usable value (data.text_column)")
    invalid = tally.empty_text + tally.empty_label
    invalid_fraction = invalid / rows_read
    if invalid_fraction > cfg.max_invalid_fraction:
        raise InputError(
            f"{origin}: {invalid} of {rows_read} rows have an empty text or label "
            f"({invalid_fraction:.1%} > data.max_invalid_fraction={cfg.max_invalid_fraction})"
        )
    # One row per kept text (label, key, position, slice values); its index is the text's place in `text`.
    text = Texts(texts)
    frame = pd.concat(kept, ignore_index=True)
    del texts, kept
    for column, values in categories.items():
        frame[column] = values.decode(frame[column].to_numpy())

    duplicates_dropped = 0
    if cfg.dedup:
        # Same folded text AND same label: a true repeat. Same text with another label stays for the gate.
        repeated = frame.duplicated(subset=["key", "label"], keep="first")
        duplicates_dropped = int(repeated.sum())
        frame = frame[~repeated]

    class_counts = counts(frame["label"])
    if len(class_counts) == 0:  # possible only with data.max_invalid_fraction 1
        raise InputError(f"{origin}: no row has both a text and a label (data.text_column, data.label_column)")
    if len(class_counts) < 2:
        raise InputError(f"{origin}: only one class ({class_counts.index[0]!r}) in column {cfg.label_column!r}; need at least 2")
    require_splittable(class_counts, origin)
    sampled_out = 0
    if cfg.sample is not None and cfg.sample < len(frame):
        if cfg.sample < MIN_ROWS_PER_CLASS * len(class_counts):
            raise InputError(f"data.sample={cfg.sample} is too small for {len(class_counts)} classes (need ≥ {MIN_ROWS_PER_CLASS} per class)")
        if len(frame) - cfg.sample < len(class_counts):  # a stratified draw leaves out at least one row per class
            raise InputError(f"data.sample={cfg.sample} leaves out {len(frame) - cfg.sample} of {len(frame)} rows, fewer than the "
                             f"{len(class_counts)} classes; use at most {len(frame) - len(class_counts)} or leave data.sample unset")
        sampled_out = len(frame) - cfg.sample
        from sklearn.model_selection import train_test_split  # here: importing it costs 80 MB of memory

        # The codes follow the sorted labels: the same draw as stratifying by the label strings themselves.
        frame, _ = train_test_split(frame, train_size=cfg.sample, stratify=frame["label"].cat.codes, random_state=cfg.seed)
        require_splittable(counts(frame["label"]), origin)

    label_names = sorted(frame["label"].unique().tolist())
    splits = split(frame, cfg)
    del frame
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        write_split(out_dir / split_file(name), text, part, cfg.slice_columns)
    del text
    data_hash = splits_hash({name: WrittenSplit(out_dir / split_file(name)) for name in SPLITS})
    card = {
        "source": cfg.source,
        "format": source_format,
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "rows_read": rows_read,
        "rows_kept": int(sum(len(part) for part in splits.values())),
        "dropped": {
            "empty_text": tally.empty_text,
            "empty_label": tally.empty_label,
            "duplicates": duplicates_dropped,
            "sampled_out": sampled_out,
        },
        "cleaning": cleaning.__dict__,
        "labels": label_names,
        "counts": {name: len(part) for name, part in splits.items()},
        "class_counts": {name: counts(part["label"]).sort_index().to_dict() for name, part in splits.items()},
        "split": split_record(cfg),
        "slice_columns": list(cfg.slice_columns),
        "dedup": cfg.dedup,
        "data_hash": data_hash,
    }
    write_json(out_dir / DATA_CARD, card)
    (out_dir / REPORT).write_text(render_report(card), encoding="utf-8")
    return IngestResult(out_dir, card["counts"], label_names, data_hash, card)


def require_splittable(class_counts: pd.Series, origin: str) -> None:
    rare = class_counts[class_counts < MIN_ROWS_PER_CLASS]
    if len(rare):
        listed = ", ".join(f"{label!r} ({count})" for label, count in rare.items())
        raise InputError(f"{origin}: labels with fewer than {MIN_ROWS_PER_CLASS} rows cannot be split: {listed} (data.label_column)")


def counts(labels: pd.Series) -> pd.Series:
    """Rows per value of a categorical column, values without rows left out."""
    found = labels.value_counts()
    return found[found > 0]


class Categories:
    """A column's strings as int32 codes: labels and slice values repeat over millions of rows."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}

    def encode(self, values: list[str]) -> np.ndarray:
        return np.array([self.code.setdefault(value, len(self.code)) for value in values], dtype=np.int32)

    def decode(self, codes: np.ndarray) -> pd.Categorical:
        """The strings again, as a Categorical with sorted categories (the order of the old string columns)."""
        return pd.Categorical.from_codes(codes, categories=list(self.code)).reorder_categories(sorted(self.code))


def clean_chunk(chunk: pd.DataFrame, cfg: DataConfig, tally: Tally, cleaning: Cleaning,
                categories: dict[str, Categories]) -> tuple[pa.Array, pd.DataFrame]:
    """A chunk's kept texts (Arrow strings) and a row for each: label, dedup key, split position, slice values
    (the last as codes of `categories`). Rows with an empty text or label are counted in `tally` and dropped."""
    texts = [None if _is_null(value) or not str(value).strip() else str(value).strip() for value in chunk["text"]]
    raw_labels = [None if _is_missing(value) else _label_str(value) for value in chunk["label"]]
    labels = [value.strip() or None if value is not None else None for value in raw_labels]
    cleaning.labels_whitespace_stripped += sum(1 for before, after in zip(raw_labels, labels) if after and before != after)
    tally.rows += len(texts)
    tally.empty_text += sum(text is None for text in texts)
    tally.empty_label += sum(label is None and text is not None for text, label in zip(texts, labels))
    tally.no_label += sum(label is None for label in labels)
    keep = [index for index, (text, label) in enumerate(zip(texts, labels)) if text is not None and label is not None]
    kept = [texts[index] for index in keep]
    slices = {column: chunk[column].tolist() for column in cfg.slice_columns}
    rows = pd.DataFrame({
        "label": categories["label"].encode([labels[index] for index in keep]),
        # 64 bits of the folded text's hash: two distinct texts among 2 million collide with p ≈ 1e-7
        "key": np.array([int(stable_hash(fold(text))[:16], 16) for text in kept], dtype=np.uint64),
        "position": np.array([split_position(text, cfg.split_salt) for text in kept], dtype=float),
        **{SLICE + column: categories[SLICE + column].encode([slice_value(values[index]) for index in keep])
           for column, values in slices.items()},
    })
    return pa.array(kept, type=pa.large_string()), rows


class Texts:
    """The kept texts, chunk by chunk as read; `take` gathers rows without concatenating the chunks first
    (Arrow's take on a chunked array does, which would briefly double the memory they hold)."""

    def __init__(self, chunks: list[pa.Array]):
        self.chunks = chunks
        self.starts = np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]])

    def take(self, indices: np.ndarray) -> pa.Array:
        owner = np.searchsorted(self.starts, indices, side="right") - 1
        order = np.argsort(owner, kind="stable")  # grouped by chunk
        pieces = [self.chunks[chunk].take(pa.array(indices[order][owner[order] == chunk] - self.starts[chunk]))
                  for chunk in np.unique(owner)]
        grouped = pa.concat_arrays(pieces) if pieces else pa.array([], type=pa.large_string())
        return grouped.take(pa.array(np.argsort(order)))  # back in the order asked


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
    stratified in expectation (binomial spread: a class of n rows gets about n·f ± √(n·f·(1−f)) test rows).
    `frame` holds a `position` per row (`clean_chunk`); each part keeps the frame's index and columns."""
    order = np.argsort(frame["position"].to_numpy(), kind="stable")  # row order independent of the file's
    position = frame["position"].to_numpy()[order]
    test = position < cfg.test_fraction
    validation = ~test & (position < cfg.test_fraction + cfg.validation_fraction)
    return {name: frame.iloc[order[rows]] for name, rows in zip(SPLITS, (~test & ~validation, validation, test))}


def write_split(path: Path, text: Texts, part: pd.DataFrame, slice_columns: list[str]) -> None:
    """One split as parquet (all columns strings), its texts gathered WRITE_ROWS at a time."""
    schema = pa.schema([(column, pa.large_string()) for column in ["text", "label", *slice_columns]])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, len(part), WRITE_ROWS):
            rows = part.iloc[start : start + WRITE_ROWS]
            columns = [rows["label"], *(rows[SLICE + column] for column in slice_columns)]
            arrays = [text.take(rows.index.to_numpy()), *(pa.array(values.astype(str), type=pa.large_string()) for values in columns)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))


class WrittenSplit:
    """A split file as `splits_hash` reads it: `split["text"]` iterates that column a row group at a time."""

    def __init__(self, path: Path):
        self.path = path

    def __getitem__(self, column: str) -> Iterator[str]:
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=WRITE_ROWS, columns=[column]):
            yield from batch.column(0).to_pylist()


def split_record(cfg: DataConfig) -> dict[str, Any]:
    """What decides which rows a split holds: two models are comparable on one test split only if these match."""
    return {"method": "hash", "salt": cfg.split_salt, "validation_fraction": cfg.validation_fraction,
            "test_fraction": cfg.test_fraction}


def slice_value(value: Any) -> str:
    return "(missing)" if _is_missing(value) else _label_str(value).strip()


# --- reading sources: each yields chunks with columns `text`, `label` and data.slice_columns (raw values) ---------


def read_source(cfg: DataConfig, cleaning: Cleaning) -> tuple[str, Iterator[pd.DataFrame]]:
    """The format name for the data card and the source's rows in chunks. A `data.format` that contradicts the
    source is refused here, before anything is read."""
    source, chosen = cfg.source, cfg.format
    try:
        codecs.lookup(cfg.encoding)
    except LookupError:
        raise InputError(f"data.encoding: unknown encoding {cfg.encoding!r}") from None
    if source == BUILTIN_BBC:
        if chosen not in ("auto", "folder"):
            raise InputError(f"data.format={chosen} contradicts data.source={source}, a folder of class sub-folders; use auto or folder")
        return f"folder ({source})", read_builtin(cfg, cleaning)
    if source.startswith("hf:"):
        if chosen != "auto":
            raise InputError(f"data.format={chosen} does not apply to {source} (datasets reads it); use auto")
        return "hf", iter([read_hub(source.removeprefix("hf:"), cfg)])
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: file not found (data.source)")
    if path.is_dir():
        if chosen not in ("auto", "folder"):
            raise InputError(f"{path}: is a folder, but data.format={chosen}; use folder or auto (data.format)")
        return "folder", read_folder(path, cfg, cleaning)
    if chosen == "folder":
        raise InputError(f"{path}: is a file, but data.format=folder; use the file's format or auto (data.format)")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (data.source)")
    file_format = TABULAR_FORMATS.get(path.suffix.lower()) if chosen == "auto" else chosen
    if file_format is None:
        supported = ", ".join(sorted(TABULAR_FORMATS))
        raise InputError(f"{path}: unsupported file type {path.suffix or '(none)'!r} (data.source); use one of {supported} "
                         f"or a folder, or set data.format (csv, tsv, jsonl, parquet)")
    if file_format == "parquet":
        return file_format, read_parquet(path, cfg)
    return file_format, read_text_file(path, file_format, cfg, cleaning)


def format_key(cfg: DataConfig) -> str:
    """The key to name when a file does not read as its format: the user's data.format, or the file name's extension."""
    return f"data.format={cfg.format}" if cfg.format != "auto" else "data.source"


def read_text_file(path: Path, file_format: str, cfg: DataConfig, cleaning: Cleaning) -> Iterator[pd.DataFrame]:
    with DecodedText(path, cfg, cleaning) as text:
        if file_format == "jsonl":
            yield from read_jsonl(path, text, cfg)
        else:
            yield from read_delimited(path, text, file_format, cfg, cleaning)


class DecodedText:
    """A text file for pandas and the JSONL reader, decoded one line at a time: a line with bytes that are not valid
    in data.encoding has them replaced and is counted (file:line examples; more than data.max_invalid_fraction of
    the lines stops ingest), CRLF becomes LF, and a UTF-8 BOM is dropped."""

    def __init__(self, path: Path, cfg: DataConfig, cleaning: Cleaning):
        self.path, self.cfg, self.cleaning = path, cfg, cleaning
        try:
            self.file = path.open("rb")
        except OSError as error:
            raise InputError(f"{path}: cannot read ({error.strerror}) (data.source)") from None
        head = self.file.read(65536)
        if b"\x00" in head:
            self.file.close()
            raise InputError(f"{path}: looks binary (NUL bytes), not a {cfg.encoding} text file ({format_key(cfg)})")
        self.cleaning.bom_removed = head.startswith(BOM)
        self.file.seek(len(BOM) if self.cleaning.bom_removed else 0)
        self.lines = self._decode()

    def _decode(self) -> Iterator[str]:
        number = 0
        for number, raw in enumerate(self.file, start=1):
            line = decode(raw, f"{self.path.name}:{number}", self.cfg.encoding, self.cleaning)
            if line.endswith("\r\n"):
                self.cleaning.crlf_line_endings = True
                line = line[:-2] + "\n"
            yield line
        bad = self.cleaning.rows_with_invalid_bytes_replaced
        if bad > self.cfg.max_invalid_fraction * max(number, 1):
            raise InputError(
                f"{self.path}: {bad} of {number} lines are not valid {self.cfg.encoding} "
                f"(first at {self.cleaning.invalid_bytes_examples[0]}); re-encode the file or set data.encoding"
            )

    def __iter__(self) -> Iterator[str]:
        return self.lines

    def read(self, size: int = -1) -> str:
        """Whole lines, at least `size` characters of them unless the file ends (pandas takes longer reads)."""
        parts, total = [], 0
        for line in self.lines:
            parts.append(line)
            total += len(line)
            if 0 <= size <= total:
                break
        return "".join(parts)

    def __enter__(self) -> "DecodedText":
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


def decode(raw: bytes, where: str, encoding: str, cleaning: Cleaning) -> str:
    """Strict decode; on failure replace the bad bytes and count the row (the caller enforces the limit)."""
    try:
        return raw.decode(encoding)
    except LookupError:  # a codec that is not a text encoding (`zlib`)
        raise InputError(f"data.encoding: unknown encoding {encoding!r}") from None
    except UnicodeDecodeError as error:
        cleaning.rows_with_invalid_bytes_replaced += 1
        if len(cleaning.invalid_bytes_examples) < 5:
            cleaning.invalid_bytes_examples.append(f"{where} byte {error.start}")
        return raw.decode(encoding, errors="replace")


def read_delimited(path: Path, text: DecodedText, file_format: str, cfg: DataConfig, cleaning: Cleaning) -> Iterator[pd.DataFrame]:
    headerless = isinstance(cfg.text_column, int) and isinstance(cfg.label_column, int)
    # header=None: the header row comes back as data and is named here, so a repeated name is seen (pandas would
    # rename it `label.1`). No usecols: with it pandas silently drops the surplus fields of a malformed row.
    options: dict[str, Any] = dict(header=None, dtype=str, keep_default_na=False, skip_blank_lines=True, chunksize=CHUNK_ROWS)
    if file_format == "tsv":
        # TSV fields are not quoted by convention: a stray " inside a text must not swallow the next rows.
        options.update(sep="\t", quoting=csv.QUOTE_NONE)
    positions = None
    try:
        for chunk in pd.read_csv(text, **options):
            if positions is None:
                names = list(range(chunk.shape[1])) if headerless else [str(name).strip() for name in chunk.iloc[0]]
                positions = resolve_columns(names, path, cfg)
                chunk = chunk if headerless else chunk.iloc[1:]
            picked = pd.DataFrame({role: chunk.iloc[:, at] for role, at in positions.items()})
            if file_format == "tsv":
                unwrap_quotes(picked, cleaning)
            yield picked
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: no rows after loading (data.source)") from None
    except (pd.errors.ParserError, csv.Error) as error:
        detail = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: cannot parse as {file_format.upper()} ({detail}) ({format_key(cfg)})") from None


def unwrap_quotes(table: pd.DataFrame, cleaning: Cleaning) -> None:
    """A TSV field wrapped entirely in quotes loses them ("" inside becomes ")."""
    for column in table.columns:
        values = table[column]
        quoted = values.str.len().ge(2) & values.str.startswith('"') & values.str.endswith('"')
        cleaning.quotes_unwrapped += int(quoted.sum())
        table.loc[quoted, column] = values[quoted].str.slice(1, -1).str.replace('""', '"', regex=False)


class _RepeatedKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) < len(pairs):
        raise _RepeatedKey(next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1))
    return record


def read_jsonl(path: Path, text: DecodedText, cfg: DataConfig) -> Iterator[pd.DataFrame]:
    """One JSON object per line. A column is the key of that name in any record; missing in a record, it is empty."""
    if isinstance(cfg.text_column, int) or isinstance(cfg.label_column, int):
        raise InputError(f"{path}: JSONL records name their fields; data.text_column and data.label_column must be names, "
                         f"not column indexes")
    wanted = {column: column for column in cfg.slice_columns} | {"text": cfg.text_column, "label": cfg.label_column}
    seen: dict[str, None] = {}  # keys in order of first appearance (for the message when a column is missing)
    values: dict[str, list[Any]] = {role: [] for role in wanted}
    for number, line in enumerate(text, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not valid JSON ({error.msg}) ({format_key(cfg)})") from None
        except RecursionError:
            raise InputError(f"{path}:{number}: not valid JSON (nested too deeply) ({format_key(cfg)})") from None
        except _RepeatedKey as repeated:
            if str(repeated) in wanted.values():
                raise InputError(f"{path}:{number}: key {str(repeated)!r} appears more than once in the record") from None
            record = json.loads(line)
        if not isinstance(record, dict):
            raise InputError(f"{path}:{number}: expected a JSON object per line")
        if len(seen) < 1000:
            seen.update(dict.fromkeys(record))
        seen.update(dict.fromkeys(name for name in wanted.values() if name in record))
        for role, name in wanted.items():
            values[role].append(record.get(name))
        if len(values["text"]) == CHUNK_ROWS:
            yield pd.DataFrame(values, dtype=object)
            values = {role: [] for role in wanted}
    resolve_columns(list(seen), path, cfg)  # every wanted key was seen in some record, or the one-line error
    yield pd.DataFrame(values, dtype=object)


def read_parquet(path: Path, cfg: DataConfig) -> Iterator[pd.DataFrame]:
    """Only the needed columns are read, CHUNK_ROWS rows at a time."""
    def unreadable(error: Exception) -> InputError:
        return InputError(f"{path}: cannot read as Parquet ({type(error).__name__}: {(str(error).splitlines() or [''])[0]}) "
                          f"({format_key(cfg)})")

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as error:  # a damaged file fails in several ways
        raise unreadable(error) from None
    columns = {role: names[at] for role, at in resolve_columns(names, path, cfg).items()}
    for role, name in columns.items():  # chosen by index, but pyarrow reads columns by name
        if names.count(name) > 1:
            raise InputError(f"{path}: {role} column {name!r} appears {names.count(name)} times in the file (data.{role}_column)")
    try:
        for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=list(dict.fromkeys(columns.values()))):
            batch.validate(full=True)  # e.g. strings that are not UTF-8: refused here, not later as a traceback
            table = batch.to_pandas()
            yield pd.DataFrame({role: table[name] for role, name in columns.items()})
    except (pa.ArrowException, OSError, ValueError) as error:  # a damaged file fails in several ways
        raise unreadable(error) from None


def resolve_columns(found: list[Any], path: Path, cfg: DataConfig) -> dict[str, int]:
    """Where each needed column sits among the source's `found` columns (names, or 0..n-1 for a headerless file):
    slice columns by name, text and label by name or 0-based index. A name found twice is refused."""
    listed = ", ".join(map(one_line, found[:50])) + (f", … ({len(found)} in all)" if len(found) > 50 else "") if found else "(none)"
    wanted = [(column, column, "data.slice_columns", "slice") for column in cfg.slice_columns]
    wanted += [("text", cfg.text_column, "data.text_column", "text"), ("label", cfg.label_column, "data.label_column", "label")]
    positions = {}
    for role, column, key, what in wanted:
        if isinstance(column, int):
            if not 0 <= column < len(found):
                raise InputError(f"{path}: {what} column index {column} out of range ({key}); the file has {len(found)} columns")
            positions[role] = column
            continue
        places = [at for at, name in enumerate(found) if name == column]
        if not places:
            raise InputError(f"{path}: {what} column {column!r} not found ({key}); columns found: {listed}")
        if len(places) > 1:
            raise InputError(f"{path}: {what} column {column!r} appears {len(places)} times in the header ({key})")
        positions[role] = places[0]
    return positions


def read_builtin(cfg: DataConfig, cleaning: Cleaning) -> Iterator[pd.DataFrame]:
    with builtin_folder(cfg.source) as folder:
        yield from read_folder(folder, cfg, cleaning)


def read_folder(folder: Path, cfg: DataConfig, cleaning: Cleaning) -> Iterator[pd.DataFrame]:
    """One sub-folder per class, one `.txt` file per example; nothing else is read. A symbolic link is followed only
    to a place inside the folder: one that leads outside it, dangles or loops stops ingest with its name."""
    if cfg.slice_columns:
        raise InputError(f"{folder}: a folder source has no columns to slice by (data.slice_columns={cfg.slice_columns})")
    root = folder.resolve()
    rows, files = [], 0
    for class_dir in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if not inside(class_dir, folder, root).is_dir():
            continue
        for file in sorted(class_dir.glob("*.txt")):
            if not inside(file, folder, root).is_file():  # a folder or a pipe named *.txt
                continue
            where = one_line(f"{class_dir.name}/{file.name}")
            try:
                raw = file.read_bytes()
            except OSError as error:
                raise InputError(f"{folder}: cannot read {where} ({error.strerror}) (data.source)") from None
            text = decode(raw, where, cfg.encoding, cleaning)
            if text.startswith("\ufeff"):
                text = text[1:]
                cleaning.bom_removed = True
            rows.append({"text": text, "label": class_dir.name})
            files += 1
            if len(rows) == CHUNK_ROWS:
                yield pd.DataFrame(rows)
                rows = []
    if not files:
        raise InputError(f"{folder}: no .txt files in class sub-folders (data.source)")
    if cleaning.rows_with_invalid_bytes_replaced > cfg.max_invalid_fraction * files:
        raise InputError(f"{folder}: {cleaning.rows_with_invalid_bytes_replaced} files are not valid {cfg.encoding}; set data.encoding")
    if rows:
        yield pd.DataFrame(rows)


def inside(path: Path, folder: Path, root: Path) -> Path:
    """`path`, or where it links to if that lies inside `root` (the folder source, resolved); else the one-line error."""
    if not path.is_symlink():
        return path
    where = one_line(path.relative_to(folder))
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop (RuntimeError before Python 3.13)
        raise InputError(f"{folder}: {where} is a broken or looping symbolic link (data.source)") from None
    if not target.is_relative_to(root):
        raise InputError(f"{folder}: {where} links to {one_line(target)}, outside the folder; links out of data.source are not "
                         f"followed (copy the files in)")
    return target


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
    pooled = pd.concat(parts, ignore_index=True)
    positions = resolve_columns(list(pooled.columns), Path(f"hf:{name}"), cfg)
    return pd.DataFrame({role: pooled.iloc[:, at] for role, at in positions.items()})


def one_line(name: Any) -> str:
    """A column or file name as it may appear in a one-line error (a header cell can hold a quoted newline)."""
    return str(name).replace("\r", "\\r").replace("\n", "\\n")


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _is_missing(value: Any) -> bool:
    return _is_null(value) or (isinstance(value, str) and value.strip() in MISSING)


def _label_str(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
