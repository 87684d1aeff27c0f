"""The data gate's checks: Great Expectations suites per split, label consistency, class balance, leakage.

Every text comparison runs on `tuneflow.text.fold` (NFKC, casefold, whitespace collapse) and stable hashes.
Rows are named by (split, row): the row's position in that split's parquet file.

Memory stays far below the data (a 1 GB CSV's 1.93 M rows validate in well under 1.5 GB): texts are read a chunk at a
time from the parquet files (`SplitSource`), their folded forms go to a scratch file read back by position
(`GateTable.folded`), and what stays in memory per row is a few numbers (split, row, label, key, length) plus the
MinHash signature (num_perm × 4 bytes) while near-duplicates are searched.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import tempfile
import zlib
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice, repeat
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from datasketch import MinHash

from tuneflow.artifacts import split_file
from tuneflow.checks import Check
from tuneflow.config import ValidationConfig
from tuneflow.data import SPLITS
from tuneflow.text import fold

PARALLEL_FROM = 20_000  # texts (or candidate pairs); below, a worker pool costs more than it saves
BUCKET_CAP = 100  # an LSH bucket with more texts compares each with this many neighbours only (candidate_pairs)
ESTIMATE_SIGMAS = 5  # candidates whose MinHash estimate is further below the threshold are not verified (likely_pairs)
CHUNK_ROWS = 50_000  # rows read, folded and checked by GX at a time
SIGNATURE_BLOCK = 10_000  # texts per MinHash task of a worker
PAIR_BLOCK = 2_000_000  # candidate pairs generated and pre-filtered at a time
SHINGLE_CACHE_CHARS = 2_000_000  # characters of texts whose shingle sets the exact check keeps at a time (~80 B each)


@dataclass(frozen=True)
class Pair:
    """Two rows whose folded texts are near-duplicates (true Jaccard of their character shingles)."""

    a: tuple[str, int]
    b: tuple[str, int]
    similarity: float


# --- where the texts are read from ------------------------------------------------------------------------

class SplitSource:
    """The splits as the gate reads them: the ingest parquet files, a chunk of rows at a time and only the columns
    asked for (never one frame holding every text), or frames already in memory (tests, callers with frames)."""

    def __init__(self, splits: dict[str, pd.DataFrame] | Path):
        self.frames = splits if isinstance(splits, dict) else None
        self.folder = None if isinstance(splits, dict) else Path(splits)

    def _file(self, split: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.folder / split_file(split))

    def columns(self, split: str) -> list[str]:
        if self.frames is not None:
            return list(self.frames[split].columns)
        schema = self._file(split).schema_arrow
        index = {column for column in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(column, str)}
        return [name for name in schema.names if name not in index]

    def num_rows(self, split: str) -> int:
        return len(self.frames[split]) if self.frames is not None else self._file(split).metadata.num_rows

    def index(self, split: str) -> pd.Index:
        """The split's row labels (what GX names unexpected rows by)."""
        return self.frames[split].index if self.frames is not None else pd.RangeIndex(self.num_rows(split))

    def column(self, split: str, name: str) -> pd.Series | None:
        """One narrow column whole (the labels), as the split's frame holds it; None when the split lacks it."""
        if name not in self.columns(split):
            return None
        if self.frames is not None:
            return self.frames[split][name]
        return pd.read_parquet(self.folder / split_file(split), columns=[name])[name]

    def text_chunks(self, split: str) -> Iterator[tuple[int, list[Any]]]:
        """(first row, texts) for about CHUNK_ROWS rows at a time; nothing when the split has no text column."""
        if "text" not in self.columns(split):
            return
        if self.frames is not None:
            texts = self.frames[split]["text"]
            for start in range(0, len(texts), CHUNK_ROWS):
                yield start, texts.iloc[start : start + CHUNK_ROWS].tolist()
            return
        start = 0
        for batch in self._file(split).iter_batches(batch_size=CHUNK_ROWS, columns=["text"]):
            texts = batch.to_pandas()["text"].tolist()
            yield start, texts
            start += len(texts)

    def texts_at(self, split: str, rows: list[int]) -> list[Any]:
        """The raw texts of these rows (evidence, removed rows): only the row groups that hold them are read."""
        if "text" not in self.columns(split):
            return [None] * len(rows)
        if self.frames is not None:
            return self.frames[split]["text"].iloc[list(rows)].tolist()
        file = self._file(split)
        bounds = np.cumsum([0] + [file.metadata.row_group(group).num_rows for group in range(file.num_row_groups)])
        found: dict[int, Any] = {}
        wanted = np.asarray(rows, dtype=np.int64)
        groups = np.searchsorted(bounds, wanted, side="right") - 1
        for group in np.unique(groups).tolist():
            texts = file.read_row_group(group, columns=["text"]).to_pandas()["text"]
            for row in wanted[groups == group].tolist():
                found[row] = texts.iloc[row - bounds[group]]
        return [found[row] for row in wanted.tolist()]


class GateTable:
    """Every row of every split, compactly: `rows` (index = table position) holds split, row, label, key (an integer
    per distinct folded text, -1 for none) and length (folded characters, -1 when the text is not a string). The
    folded texts live in a scratch file, read back by position; the raw texts stay in the source."""

    def __init__(self, rows: pd.DataFrame, source: SplitSource, spill: Any, offsets: np.ndarray):
        self.rows, self.source, self._spill, self._offsets = rows, source, spill, offsets
        counts = [int((rows["split"] == name).sum()) for name in SPLITS]
        self.split_names = np.repeat(np.array(SPLITS, dtype=object), counts)  # 3 strings shared, not one per row
        self.row_numbers = rows["row"].to_numpy()
        self._lengths = rows["length"].to_numpy()
        self._starts = dict(zip(SPLITS, np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()))

    def place(self, position: int) -> tuple[str, int]:
        return self.split_names[position], int(self.row_numbers[position])

    def position(self, place: tuple[str, int]) -> int:
        return self._starts[place[0]] + place[1]

    def folded(self, positions: Any) -> list[str | None]:
        """The folded texts at these table positions (None where the text is not a string)."""
        lengths, descriptor, offsets, texts = self._lengths, self._spill.fileno(), self._offsets, []
        for position in np.asarray(positions, dtype=np.int64).tolist():
            start, stop = int(offsets[position]), int(offsets[position + 1])
            texts.append(None if lengths[position] < 0 else os.pread(descriptor, stop - start, start).decode("utf-8"))
        return texts

    def folded_range(self, start: int, stop: int) -> list[str | None]:
        """The folded texts of positions start..stop-1, in one read."""
        offsets, lengths = self._offsets, self._lengths
        base = int(offsets[start])
        data = os.pread(self._spill.fileno(), int(offsets[stop]) - base, base)
        return [None if lengths[position] < 0 else data[offsets[position] - base : offsets[position + 1] - base].decode("utf-8")
                for position in range(start, stop)]

    def texts(self, positions: Any) -> list[Any]:
        """The raw texts at these table positions, read from the source split by split."""
        positions = np.asarray(positions, dtype=np.int64)
        found: dict[int, Any] = {}
        for split in SPLITS:
            mine = positions[self.split_names[positions] == split] if len(positions) else positions
            if len(mine):
                found.update(zip(mine.tolist(), self.source.texts_at(split, self.row_numbers[mine].tolist())))
        return [found[position] for position in positions.tolist()]

    def close(self) -> None:
        self._spill.close()


def table(splits: dict[str, pd.DataFrame] | Path | SplitSource) -> GateTable:
    """All splits as one GateTable, read a chunk at a time: each text folded once, hashed (blake2b of the folded
    text, the key of exact comparisons) and its folded form written to the scratch file."""
    source = splits if isinstance(splits, SplitSource) else SplitSource(splits)
    spill = tempfile.TemporaryFile(prefix="tuneflow-gate-")
    names, labels, lengths, digests, sizes = [], [], [], [], []
    for name in SPLITS:
        count = source.num_rows(name)
        label = source.column(name, "label")
        labels.append(label.reset_index(drop=True) if label is not None else pd.Series([None] * count, dtype=object))
        names.append(count)
        seen = 0
        for _, texts in source.text_chunks(name):
            folded = [fold(text) if isinstance(text, str) else None for text in texts]
            encoded = [text.encode("utf-8") if text is not None else b"" for text in folded]
            spill.write(b"".join(encoded))
            sizes.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
            lengths.append(np.fromiter((len(text) if text is not None else -1 for text in folded), dtype=np.int64, count=len(folded)))
            digests.append(b"".join(hashlib.blake2b(data, digest_size=16).digest() if text else bytes(16)
                                    for data, text in zip(encoded, folded)))
            seen += len(texts)
        if seen < count:  # no text column: no text, no key
            sizes.append(np.zeros(count - seen, dtype=np.int64))
            lengths.append(np.full(count - seen, -1, dtype=np.int64))
            digests.append(bytes(16) * (count - seen))
    spill.flush()
    length = np.concatenate(lengths)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(sizes))]).astype(np.int64)
    # one integer per distinct folded text: the same grouping as its blake2b hex digest, in 8 bytes instead of ~80
    digest = np.frombuffer(b"".join(digests), dtype="V16")
    _, key = np.unique(digest, return_inverse=True)
    key = np.where(length > 0, key.astype(np.int64), -1)
    rows = pd.DataFrame({
        "split": np.repeat(np.array(SPLITS, dtype=object), names),
        "row": np.concatenate([np.arange(count, dtype=np.int64) for count in names]),
        "label": pd.concat(labels, ignore_index=True),  # Arrow strings from parquet: no Python object per row
        "key": key,
        "length": length,
    })
    return GateTable(rows, source, spill, offsets)


# --- Great Expectations: one suite per split ------------------------------------------------------------

# expectation type -> (check name, what it means)
GX_CHECKS = {
    "expect_table_columns_to_match_set": ("columns", "every split has exactly the columns text, label and data.slice_columns"),
    "expect_table_row_count_to_be_between": ("min_rows_per_split", "each split has at least validation.min_rows_per_split rows"),
    "expect_column_values_to_not_be_null": ("not_null", "no missing text or label"),
    "expect_column_value_lengths_to_be_between": ("text_length", "folded text length within validation.min_text_chars..max_text_chars"),
    "expect_column_distinct_values_to_equal_set": ("label_set", "train holds exactly the schema's label set; validation/test labels are within it"),
    "expect_column_distinct_values_to_be_in_set": ("label_set", "train holds exactly the schema's label set; validation/test labels are within it"),
}


SUITE_ORDER = [  # (type, column) of each split's expectations, in the order their evidence is listed
    ("expect_table_columns_to_match_set", ""), ("expect_table_row_count_to_be_between", ""),
    ("expect_column_values_to_not_be_null", "text"), ("expect_column_values_to_not_be_null", "label"),
    ("expect_column_value_lengths_to_be_between", "text"), ("expect_column_distinct_values_to_equal_set", "label"),
    ("expect_column_distinct_values_to_be_in_set", "label"),
]


def gx_checks(rows: GateTable, labels: list[str], columns: list[str], cfg: ValidationConfig) -> list[Check]:
    """Run a GX expectation suite per split (ephemeral context, pandas source); one Check per expectation kind.

    The text expectations see the folded texts (as every other check does), CHUNK_ROWS rows at a time, their
    unexpected counts and rows added up; the table and label expectations see the whole split through a narrow
    frame (the real label column, every other column a 1-byte placeholder), so no frame ever holds every text."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("tuneflow")
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.evidence_rows}
    findings: dict[str, list[dict[str, Any]]] = {check_name: [] for check_name, _ in GX_CHECKS.values()}
    counts: dict[str, int] = dict.fromkeys(findings, 0)
    start = 0
    for name in SPLITS:
        present, index = rows.source.columns(name), rows.source.index(name)
        label = rows.source.column(name, "label")
        narrow = pd.DataFrame({column: (label if column == "label" else pd.Series(np.zeros(len(index), dtype=bool), index=index))
                               for column in present}, index=index)
        label_rule = (gxe.ExpectColumnDistinctValuesToEqualSet if name == "train" else gxe.ExpectColumnDistinctValuesToBeInSet)
        whole = gx.ExpectationSuite(name=f"tuneflow-{name}", expectations=[
            gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=True),
            gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows_per_split),
            gxe.ExpectColumnValuesToNotBeNull(column="label"),
            label_rule(column="label", value_set=list(labels)),
        ])
        chunked = gx.ExpectationSuite(name=f"tuneflow-{name}-text", expectations=[
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_text_chars, max_value=cfg.max_text_chars),
        ])
        batches = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all")
        found: dict[tuple[str, str], dict[str, Any] | None] = {}
        for outcome in batches.get_batch(batch_parameters={"dataframe": narrow}).validate(whole, result_format=result_format).results:
            found[_expectation_id(outcome)] = None if outcome.success else _gx_evidence(name, outcome, narrow)
        count = len(index)
        frames = ((narrow,) if "text" not in present else
                  (pd.DataFrame(index=index[offset : offset + CHUNK_ROWS]).assign(
                      text=np.array(rows.folded_range(start + offset, start + min(offset + CHUNK_ROWS, count)), dtype=object))
                   for offset in range(0, max(count, 1), CHUNK_ROWS)))
        for frame in frames:
            for outcome in batches.get_batch(batch_parameters={"dataframe": frame}).validate(chunked, result_format=result_format).results:
                key = _expectation_id(outcome)
                item = None if outcome.success else _gx_evidence(name, outcome, frame)
                found[key] = _merged(found.get(key), item, cfg.evidence_rows)
        start += count
        for key in SUITE_ORDER:
            item = found.get(key)
            if item is not None:
                check_name = GX_CHECKS[key[0]][0]
                findings[check_name].append(item)
                counts[check_name] += item.get("unexpected_count", 1)
    counts["min_rows_per_split"] = min(rows.source.num_rows(name) for name in SPLITS)
    return [
        Check(check_name, not findings[check_name], counts[check_name], _gx_threshold(check_name, cfg),
              f"GX: {message}" + (_finding_count(check_name, counts[check_name]) if findings[check_name] else ""),
              evidence=findings[check_name][: cfg.evidence_rows])
        for check_name, message in dict(GX_CHECKS.values()).items()
    ]


def _finding_count(check_name: str, count: int) -> str:
    return f" (smallest split: {count} rows)" if check_name == "min_rows_per_split" else f" ({count} unexpected)"


def _expectation_id(outcome: Any) -> tuple[str, str]:
    return outcome.expectation_config.type, outcome.expectation_config.kwargs.get("column", "")


def _merged(earlier: dict[str, Any] | None, later: dict[str, Any] | None, limit: int) -> dict[str, Any] | None:
    """One expectation's evidence over two consecutive chunks: counts added, rows and values listed in order."""
    if earlier is None or later is None:
        return earlier or later
    if "error" in earlier or "error" in later:
        return earlier
    merged = dict(earlier)
    merged["unexpected_count"] = earlier.get("unexpected_count", 0) + later.get("unexpected_count", 0)
    for field in ("rows", "values"):
        if later.get(field):
            merged[field] = (earlier.get(field, []) + later[field])[:limit]
    return merged


def _gx_evidence(split: str, outcome: Any, frame: pd.DataFrame) -> dict[str, Any]:
    config = outcome.expectation_config
    item: dict[str, Any] = {"split": split, "expectation": config.type}
    if "column" in config.kwargs:
        item["column"] = config.kwargs["column"]
    if outcome.exception_info and outcome.exception_info.get("raised_exception"):
        item["error"] = str(outcome.exception_info.get("exception_message", "")).splitlines()[0][:300]
        return item
    found = outcome.result
    if "unexpected_count" in found:
        item["unexpected_count"] = int(found["unexpected_count"])
    if found.get("partial_unexpected_index_list"):
        item["rows"] = [int(row) for row in found["partial_unexpected_index_list"]]
    if found.get("partial_unexpected_list"):
        item["values"] = [excerpt(value) if isinstance(value, str) else _plain(value) for value in found["partial_unexpected_list"]]
    if found.get("observed_value") is not None:
        item["observed"] = _plain(found["observed_value"])
    if config.type.startswith("expect_column_distinct_values"):
        seen = {str(value) for value in frame["label"].dropna().unique()} if "label" in frame else set()
        expected = {str(value) for value in config.kwargs["value_set"]}
        item["unknown_labels"], item["missing_labels"] = sorted(seen - expected), sorted(expected - seen) if split == "train" else []
        item["unexpected_count"] = len(item["unknown_labels"]) + len(item["missing_labels"])
    return item


def _gx_threshold(check_name: str, cfg: ValidationConfig) -> Any:
    return {"min_rows_per_split": cfg.min_rows_per_split, "text_length": [cfg.min_text_chars, cfg.max_text_chars]}.get(check_name, 0)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple, set)):
        return [_plain(item) for item in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


# --- label consistency, class balance, exact duplicates ---------------------------------------------

def label_conflicts(rows: GateTable, cfg: ValidationConfig) -> Check:
    """The same folded text with two labels: one of them is wrong, and the model learns noise."""
    frame = rows.rows
    labelled = frame[(frame["key"] >= 0) & frame["label"].notna()]
    conflicting = labelled.groupby("key")["label"].nunique()
    conflicting = conflicting[conflicting > 1].index
    involved = labelled[labelled["key"].isin(conflicting)]
    shown = involved["key"].drop_duplicates().head(cfg.evidence_rows)  # the first groups, in order of appearance
    return Check("label_conflicts", not len(conflicting), len(conflicting), 0,
              f"{len(conflicting)} normalised texts carry more than one label",
              evidence=[_places(rows, involved[involved["key"] == key]) for key in shown])


def class_balance(rows: GateTable, cfg: ValidationConfig) -> list[Check]:
    frame = rows.rows
    counts = frame.loc[frame["split"] == "train", "label"].dropna().astype(str).value_counts().sort_index()
    per_class = {label: int(count) for label, count in counts.items()}
    ratio = round(float(counts.max() / counts.min()), 3) if len(counts) else 0.0
    rare = {label: count for label, count in per_class.items() if count < cfg.min_class_rows}
    total = int(len(frame))
    return [
        Check("class_ratio", ratio <= cfg.max_class_ratio, ratio, cfg.max_class_ratio,
              f"largest/smallest class in train is {ratio:g} (max {cfg.max_class_ratio:g})",
              evidence=[per_class]),
        Check("min_class_rows", not rare, min(per_class.values(), default=0), cfg.min_class_rows,
              f"every class has at least {cfg.min_class_rows} rows in train",
              evidence=[rare] if rare else []),
        Check("min_total_rows", total >= cfg.min_total_rows, total, cfg.min_total_rows,
              f"{total} rows in all splits (warning below {cfg.min_total_rows})",
              severity="warning"),
    ]


def label_coverage(rows: GateTable, labels: list[str]) -> list[Check]:
    """Every label in test (no verdict is possible for a class without test rows) and, as a warning, in validation."""
    frame = rows.rows
    checks = []
    for split, severity in (("test", "error"), ("validation", "warning")):
        missing = sorted(set(labels) - set(frame.loc[frame["split"] == split, "label"]))
        reason = (f"{split} has no rows of {', '.join(map(repr, missing))}: add rows of that class or change data.split_salt"
                  if missing else f"every label has {split} rows")
        checks.append(Check(f"{split}_label_coverage", not missing, len(missing), 0, reason, severity=severity,
                            evidence=[{"split": split, "label": label} for label in missing]))
    return checks


def exact_duplicates(rows: GateTable, cfg: ValidationConfig) -> list[Check]:
    """Groups of rows with the same folded text: across splits (leakage, an error) and within one split.
    Groups are counted, and only the first validation.evidence_rows of each kind are gathered as evidence."""
    frame = rows.rows
    keyed = frame[frame["key"] >= 0]
    repeated = keyed[keyed.duplicated("key", keep=False)]
    spread = repeated.groupby("key")["split"].nunique()
    leaked_keys = spread[spread > 1].index
    leaked = repeated[repeated["key"].isin(leaked_keys)]
    leaked_rows = int((leaked["split"] != leaked.groupby("key")["split"].transform("first")).sum())
    all_groups = repeated["key"].nunique()
    within = repeated[repeated.duplicated(["key", "split"], keep=False)]
    within_heads = within.drop_duplicates(["key", "split"])
    leak_evidence = [_places(rows, leaked[leaked["key"] == key]) for key in leaked["key"].drop_duplicates().head(cfg.evidence_rows)]
    within_evidence = [_places(rows, within[(within["key"] == key) & (within["split"] == split)])
                       for key, split in within_heads[["key", "split"]].head(cfg.evidence_rows).itertuples(index=False)]
    return [
        Check("exact_leakage", not len(leaked_keys), len(leaked_keys), 0,
              f"{len(leaked_keys)} of {all_groups} groups of identical normalised texts span splits "
              f"({leaked_rows} rows beyond their first split)",
              evidence=leak_evidence),
        Check("duplicates_within_split", not len(within_heads), len(within_heads), 0,
              f"{len(within_heads)} normalised texts repeat inside one split (they weigh double in training/metrics)",
              severity="warning", evidence=within_evidence),
    ]


# --- near-duplicates: MinHash LSH, each candidate verified by its true Jaccard ------------------------

@dataclass(frozen=True)
class NearGroup:
    """Every row of one folded text (a) paired with every row of another (b): with data.dedup=false a text can
    repeat k times, and one near-duplicate pair of texts stands for k × k' row pairs, counted but never built."""

    a: tuple[int, ...]  # table positions
    b: tuple[int, ...]
    similarity: float


class NearDuplicates:
    """The near-duplicate row pairs found, as groups (NearGroup); iterating yields Pair items, in the order of the
    texts' first appearance. `capped`: what the bucket cap cut (None when nothing)."""

    def __init__(self, groups: list[NearGroup], rows: GateTable | None = None, capped: dict[str, int] | None = None):
        self.groups, self.table, self.capped = groups, rows, capped

    def __len__(self) -> int:
        return sum(len(group.a) * len(group.b) for group in self.groups)

    def __iter__(self) -> Iterator[Pair]:
        return self.where(lambda a, b: True)

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (list, NearDuplicates)) else NotImplemented

    def where(self, keep: Callable[[int, int], bool], values: np.ndarray | None = None, equal: bool | None = None) -> Iterator[Pair]:
        """The pairs (positions a, b) for which keep(a, b), in order; with `values` and `equal`, rows a whose
        every partner fails (values[a] == values[b] is not `equal`) are skipped without looking at each pair."""
        for group in self.groups:
            partners = Counter(values[list(group.b)].tolist()) if values is not None else None
            for a in group.a:
                if partners is not None and not _matching(values[a], partners, equal):
                    continue
                for b in group.b:
                    if keep(a, b):
                        yield Pair(self.table.place(a), self.table.place(b), group.similarity)

    def count(self, values: np.ndarray, equal: bool) -> int:
        """How many pairs have values[a] == values[b] (equal=True) or differ (equal=False), from per-group counts."""
        total = 0
        for group in self.groups:
            mine, partners = Counter(values[list(group.a)].tolist()), Counter(values[list(group.b)].tolist())
            total += sum(times * _matching(value, partners, equal) for value, times in mine.items())
        return total


def _matching(value: Any, partners: Counter, equal: bool) -> int:
    """How many partners compare equal (or unequal) to `value` with ==/!=, as the pairs themselves would."""
    return sum(times for other, times in partners.items() if (value != other) != equal)


def shingles(folded: str, size: int) -> set[bytes]:
    """Character n-grams, as bytes: UTF-32 gives every character 4 bytes, so slicing the encoded text once is exact."""
    data, width = folded.encode("utf-32-le"), 4 * size
    return {data[i : i + width] for i in range(0, len(data) - width + 4, 4)} or {data}


def near_duplicate_pairs(rows: GateTable, cfg: ValidationConfig) -> NearDuplicates:
    """Pairs of rows with distinct folded texts whose shingle Jaccard ≥ validation.near_dup_jaccard.

    Work and memory per text are bounded: a large LSH bucket (boilerplate) pairs each text with BUCKET_CAP
    neighbours only, and says so (`capped`); candidates the signatures already rule out are never verified."""
    frame = rows.rows
    unique = frame[frame["key"] >= 0].drop_duplicates("key")
    unique = unique[unique["length"] <= cfg.max_text_chars]  # oversize texts already fail text_length
    positions = unique.index.to_numpy()  # table position of each distinct text, in order of first appearance
    hashvalues = signatures(rows, positions, cfg)
    first, second, capped = candidate_pairs(hashvalues, lambda members: rows.folded(positions[members]), cfg)
    del hashvalues  # before the exact check's workers fork
    similar = exact_pairs(rows, positions, first, second, cfg)
    keys = frame["key"].to_numpy()
    wanted = np.unique(keys[positions[[index for pair in similar for index in pair[:2]]]]) if similar else np.empty(0, np.int64)
    involved = frame.index[frame["key"].isin(wanted)].to_numpy()
    places: dict[int, list[int]] = {}
    for key, position in zip(keys[involved].tolist(), involved.tolist()):
        places.setdefault(key, []).append(position)
    groups = [NearGroup(tuple(places[keys[positions[i]]]), tuple(places[keys[positions[j]]]), round(jaccard, 4))
              for i, j, jaccard in similar]
    return NearDuplicates(groups, rows, capped)


def candidate_pairs(hashvalues: np.ndarray, folded_of: Callable[[np.ndarray], list[str]],
                    cfg: ValidationConfig) -> tuple[np.ndarray, np.ndarray, dict[str, int] | None]:
    """Texts that share an LSH bucket in any band and that the MinHash estimate does not rule out (likely_pairs),
    as sorted index pairs (first < second), and what the cap cut (None if nothing).

    A band's buckets are found by sorting the signatures on that band's values: rows with equal values are
    adjacent. This is the bucketing of datasketch's MinHashLSH (same bands, same rows per band), without its
    in-memory index: that keeps a Python set per bucket and costs about 4 KB per text (8 GB at 2 M texts), and
    datasketch offers no compact local storage (only Redis/Cassandra). Pairs are generated and pre-filtered
    PAIR_BLOCK at a time, so memory holds only the survivors.

    A bucket of more than BUCKET_CAP + 1 texts (boilerplate: thousands of texts alike) would make this quadratic:
    there each text is paired with its BUCKET_CAP neighbours in folded-text order instead (near-duplicates share
    long runs of text, so they mostly sort close together)."""
    n = len(hashvalues)
    bands, width = lsh_bands(cfg.near_dup_jaccard, cfg.num_perm)
    kept = [np.empty(0, dtype=np.int64)]  # first * n + second
    capped_buckets, largest, capped_texts = 0, 0, [np.empty(0, dtype=np.int64)]

    def keep(a: np.ndarray, b: np.ndarray) -> None:
        first, second = likely_pairs(hashvalues, np.minimum(a, b), np.maximum(a, b), cfg)
        kept.append(first * n + second)

    for band in range(bands):
        values = hashvalues[:, band * width : (band + 1) * width]
        order = np.lexsort(values.T[::-1])
        ordered = values[order]
        starts = np.flatnonzero(np.concatenate([[True], np.any(ordered[1:] != ordered[:-1], axis=1)])) if n else np.empty(0, np.int64)
        sizes = np.diff(np.concatenate([starts, [n]]))
        del ordered
        for size in np.unique(sizes[(sizes >= 2) & (sizes <= BUCKET_CAP + 1)]).tolist():
            heads = starts[sizes == size]
            left, right = np.triu_indices(size, 1)
            per_block = max(1, PAIR_BLOCK // len(left))
            for at in range(0, len(heads), per_block):
                members = order[heads[at : at + per_block, None] + np.arange(size)]
                keep(members[:, left].ravel(), members[:, right].ravel())
        for head, size in zip(starts[sizes > BUCKET_CAP + 1].tolist(), sizes[sizes > BUCKET_CAP + 1].tolist()):
            capped_buckets, largest = capped_buckets + 1, max(largest, size)
            members = order[head : head + size]
            capped_texts.append(members)
            texts = folded_of(members)
            by_text = members[sorted(range(size), key=texts.__getitem__)]
            del texts
            for offset in range(1, BUCKET_CAP + 1):
                keep(by_text[:-offset], by_text[offset:])
    first, second = np.divmod(np.unique(np.concatenate(kept)), n) if n else (np.empty(0, np.int64),) * 2
    capped = ({"buckets": capped_buckets, "largest_bucket": largest, "texts": len(np.unique(np.concatenate(capped_texts))),
               "neighbours_per_text": BUCKET_CAP} if capped_buckets else None)
    return first, second, capped


def likely_pairs(hashvalues: np.ndarray, first: np.ndarray, second: np.ndarray, cfg: ValidationConfig) -> tuple[np.ndarray, np.ndarray]:
    """The candidates whose MinHash estimate of the Jaccard (the share of equal signature values) is within
    ESTIMATE_SIGMAS standard errors of the threshold or above: the others would fail the exact check, and skipping
    them spares building their shingle sets (at 64 permutations and 0.8, a true 0.8 pair is dropped with p ≈ 1e-6)."""
    threshold = cfg.near_dup_jaccard
    floor = threshold - ESTIMATE_SIGMAS * (threshold * (1 - threshold) / cfg.num_perm) ** 0.5
    keep = np.zeros(len(first), dtype=bool)
    for start in range(0, len(first), 100_000):  # 100,000 × num_perm comparisons at a time
        block = slice(start, start + 100_000)
        keep[block] = (hashvalues[first[block]] == hashvalues[second[block]]).mean(axis=1) >= floor
    return first[keep], second[keep]


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) with the fewest bands that still make a pair at `threshold` a candidate with p ≥ 0.99.

    datasketch's own optimum balances false positives and negatives at the threshold (p ≈ 0.88 there); every
    candidate is verified by its exact Jaccard afterwards, so recall is what the bands must buy.
    """
    for rows in range(num_perm // 2, 0, -1):  # at least 2 bands
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= 0.99:
            return bands, rows
    return num_perm, 1


# Forked workers find the table here (set by their pool's initializer): they read texts from its scratch file by
# position, so a task is a range of positions, never pickled texts.
_WORKER_TABLE: tuple[GateTable, np.ndarray] | None = None


def _adopt(rows: GateTable, positions: np.ndarray) -> None:
    global _WORKER_TABLE
    _WORKER_TABLE = (rows, positions)


def _pool(rows: GateTable, positions: np.ndarray, workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_adopt,
                               initargs=(rows, positions))


def _workers(items: int) -> int:
    return min(os.cpu_count() or 1, 8) if items >= PARALLEL_FROM else 1


def _signatures(texts: list[str], size: int, num_perm: int) -> np.ndarray:
    generator = MinHash.generator((shingles(text, size) for text in texts), num_perm=num_perm, hashfunc=zlib.crc32)
    return np.array([minhash.hashvalues for minhash in generator], dtype=np.uint32).reshape(len(texts), num_perm)


def _signature_block(start: int, stop: int, size: int, num_perm: int) -> np.ndarray:
    rows, positions = _WORKER_TABLE
    return _signatures(rows.folded(positions[start:stop]), size, num_perm)


def signatures(rows: GateTable, positions: np.ndarray, cfg: ValidationConfig) -> np.ndarray:
    """MinHash signatures of the character shingles of the texts at `positions`, SIGNATURE_BLOCK texts at a time;
    large inputs are split over the CPU cores (forked workers that read the texts themselves)."""
    found = np.empty((len(positions), cfg.num_perm), dtype=np.uint32)
    starts = range(0, len(positions), SIGNATURE_BLOCK)
    workers = _workers(len(positions))
    if workers == 1:
        _adopt(rows, positions)
        blocks = map(_signature_block, starts, (min(start + SIGNATURE_BLOCK, len(positions)) for start in starts),
                     repeat(cfg.shingle_chars), repeat(cfg.num_perm))
        for start, block in zip(starts, blocks):
            found[start : start + len(block)] = block
        return found
    with _pool(rows, positions, workers) as pool:
        blocks = pool.map(_signature_block, starts, [min(start + SIGNATURE_BLOCK, len(positions)) for start in starts],
                          repeat(cfg.shingle_chars), repeat(cfg.num_perm))
        for start, block in zip(starts, blocks):
            found[start : start + len(block)] = block
    return found


def _exact_block(first: np.ndarray, second: np.ndarray, size: int, threshold: float) -> list[tuple[int, int, float]]:
    """The pairs whose exact shingle Jaccard ≥ threshold; pairs come sorted by `first`, so its set is built once,
    and the other sets are kept while they fit in SHINGLE_CACHE_CHARS characters."""
    rows, positions = _WORKER_TABLE
    cache: dict[int, set[bytes]] = {}
    cached_chars, similar = 0, []
    for i, j in zip(first.tolist(), second.tolist()):
        for index in (i, j):
            if index not in cache:
                if cached_chars > SHINGLE_CACHE_CHARS:
                    cache, cached_chars = {i: cache[i]} if i in cache else {}, 0
                text = rows.folded(positions[[index]])[0]
                cache[index] = shingles(text, size)
                cached_chars += len(text)
        both = len(cache[i] & cache[j])
        jaccard = both / (len(cache[i]) + len(cache[j]) - both)
        if jaccard >= threshold:
            similar.append((i, j, jaccard))
    return similar


def exact_pairs(rows: GateTable, positions: np.ndarray, first: np.ndarray, second: np.ndarray,
                cfg: ValidationConfig) -> list[tuple[int, int, float]]:
    """(i, j, Jaccard) of the candidates that are near-duplicates, in candidate order; texts read by position."""
    block = 50_000
    starts = range(0, len(first), block)
    args = ([first[start : start + block] for start in starts], [second[start : start + block] for start in starts],
            repeat(cfg.shingle_chars), repeat(cfg.near_dup_jaccard))
    workers = _workers(len(first))
    if workers == 1:
        _adopt(rows, positions)
        return [pair for found in map(_exact_block, *args) for pair in found]
    with _pool(rows, positions, workers) as pool:
        return [pair for found in pool.map(_exact_block, *args) for pair in found]


def near_duplicate_checks(rows: GateTable, pairs: NearDuplicates, cfg: ValidationConfig) -> list[Check]:
    splits, labels = rows.split_names, rows.rows["label"].to_numpy()
    across, conflicting, within = pairs.count(splits, equal=False), pairs.count(labels, equal=False), pairs.count(splits, equal=True)
    rule = f"character {cfg.shingle_chars}-gram Jaccard ≥ {cfg.near_dup_jaccard:g}"
    capped = pairs.capped
    if capped:
        rule += (f"; search capped in {capped['buckets']} LSH buckets of up to {capped['largest_bucket']} alike texts, "
                 f"each compared with {capped['neighbours_per_text']} neighbours: a lower bound")

    def evidence(values: np.ndarray, equal: bool) -> list[dict[str, Any]]:
        noted = [{"search_capped": capped}] if capped else []
        found = list(islice(pairs.where(lambda a, b: (values[a] != values[b]) != equal, values, equal), cfg.evidence_rows))
        return (noted + _pairs(rows, found))[: cfg.evidence_rows]

    return [
        Check("near_dup_leakage", across <= cfg.max_near_dup_leak, across, cfg.max_near_dup_leak,
              f"{across} near-duplicate pairs across splits ({rule})", evidence=evidence(splits, False)),
        Check("near_dup_label_conflicts", not conflicting, conflicting, 0,
              f"{conflicting} near-duplicate pairs carry different labels ({rule})",
              severity="warning", evidence=evidence(labels, False)),
        Check("near_dup_within_split", not within, within, 0,
              f"{within} near-duplicate pairs inside one split ({rule})",
              severity="info", evidence=evidence(splits, True)),
    ]


def naive_near_duplicate_pairs(texts: list[str], cfg: ValidationConfig) -> list[tuple[int, int, float]]:
    """The O(n²) reference (benchmarks only): the exact Jaccard of every pair, as one sparse matrix product."""
    from sklearn.feature_extraction.text import CountVectorizer

    n = cfg.shingle_chars
    grams = CountVectorizer(analyzer="char", ngram_range=(n, n), lowercase=False, binary=True).fit_transform(texts)
    sizes = np.asarray(grams.sum(axis=1)).ravel()
    shared = (grams @ grams.T).tocoo()
    found = []
    for i, j, both in zip(shared.row, shared.col, shared.data):
        if i < j and both / (sizes[i] + sizes[j] - both) >= cfg.near_dup_jaccard:
            found.append((int(i), int(j), float(both / (sizes[i] + sizes[j] - both))))
    return found


# --- evidence helpers ---------------------------------------------------------------------------------

def excerpt(text: str, width: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _place(split: str, row: int, label: Any, text: Any) -> dict[str, Any]:
    return {"split": split, "row": int(row), "label": _plain(label), "text": excerpt(text) if isinstance(text, str) else None}


def _places(rows: GateTable, group: pd.DataFrame) -> list[dict[str, Any]]:
    texts = rows.texts(group.index.to_numpy())
    return [_place(split, row, label, text) for (split, row, label), text
            in zip(group[["split", "row", "label"]].itertuples(index=False), texts)]


def _pairs(rows: GateTable, pairs: list[Pair]) -> list[dict[str, Any]]:
    """Pairs as evidence: similarity and both rows (split, row, label, text excerpt)."""
    ends = [rows.position(place) for pair in pairs for place in (pair.a, pair.b)]
    texts, labels = rows.texts(ends), rows.rows["label"].to_numpy()[ends] if ends else []
    return [{"similarity": pair.similarity, "a": _place(*pair.a, labels[2 * k], texts[2 * k]),
             "b": _place(*pair.b, labels[2 * k + 1], texts[2 * k + 1])} for k, pair in enumerate(pairs)]
