"""The data gate's checks: Great Expectations suites per split, label consistency, class balance, leakage.

Every text comparison runs on `tuneflow.text.fold` (NFKC, casefold, whitespace collapse) and stable hashes.
Rows are named by (split, row): the row's position in that split's parquet file.
"""

from __future__ import annotations

import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import pandas as pd
from datasketch import MinHash

from tuneflow.checks import Check
from tuneflow.config import ValidationConfig
from tuneflow.data import SPLITS
from tuneflow.text import fold, stable_hash

PARALLEL_FROM = 20_000  # texts; below, a worker pool costs more than it saves
BUCKET_CAP = 100  # an LSH bucket with more texts compares each with this many neighbours only (candidate_pairs)
ESTIMATE_SIGMAS = 5  # candidates whose MinHash estimate is further below the threshold are not verified (likely_pairs)


@dataclass(frozen=True)
class Pair:
    """Two rows whose folded texts are near-duplicates (true Jaccard of their character shingles)."""

    a: tuple[str, int]
    b: tuple[str, int]
    similarity: float


class NearDuplicates(list):
    """The near-duplicate pairs found (Pair items) and, when a bucket exceeded BUCKET_CAP, what the cap cut."""

    capped: dict[str, int] | None = None


def table(splits: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All splits as one frame: split, row, text, label, folded, key (stable hash of the folded text)."""
    parts = []
    for name in SPLITS:
        frame = splits[name]
        texts = frame["text"] if "text" in frame else pd.Series([None] * len(frame), dtype=object)
        labels = frame["label"] if "label" in frame else pd.Series([None] * len(frame), dtype=object)
        parts.append(pd.DataFrame({"split": name, "row": range(len(frame)), "text": texts.to_numpy(), "label": labels.to_numpy()}))
    rows = pd.concat(parts, ignore_index=True)
    folded = [fold(text) if isinstance(text, str) else None for text in rows["text"]]
    rows["folded"] = pd.Series(folded, dtype=object)
    rows["key"] = pd.Series([stable_hash(text) if text else None for text in folded], dtype=object)
    return rows


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


def gx_checks(splits: dict[str, pd.DataFrame], rows: pd.DataFrame, labels: list[str], columns: list[str],
              cfg: ValidationConfig) -> list[Check]:
    """Run a GX expectation suite per split (ephemeral context, pandas source); one Check per expectation kind.
    `rows` is `table(splits)`: its folded texts are what the text checks see."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("tuneflow")
    findings: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, int] = {}
    for name in SPLITS:
        frame = splits[name]
        if "text" in frame:  # text checks see the folded text, as every other check does
            frame = frame.assign(text=rows.loc[rows["split"] == name, "folded"].to_numpy())
        label_rule = (gxe.ExpectColumnDistinctValuesToEqualSet if name == "train" else gxe.ExpectColumnDistinctValuesToBeInSet)
        suite = gx.ExpectationSuite(name=f"tuneflow-{name}", expectations=[
            gxe.ExpectTableColumnsToMatchSet(column_set=columns, exact_match=True),
            gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows_per_split),
            gxe.ExpectColumnValuesToNotBeNull(column="text"),
            gxe.ExpectColumnValuesToNotBeNull(column="label"),
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_text_chars, max_value=cfg.max_text_chars),
            label_rule(column="label", value_set=list(labels)),
        ])
        batch = (source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all")
                 .get_batch(batch_parameters={"dataframe": frame}))
        result = batch.validate(suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": cfg.evidence_rows})
        for outcome in result.results:
            check_name, _ = GX_CHECKS[outcome.expectation_config.type]
            findings.setdefault(check_name, [])
            counts.setdefault(check_name, 0)
            if outcome.success:
                continue
            item = _gx_evidence(name, outcome, frame)
            findings[check_name].append(item)
            counts[check_name] += item.get("unexpected_count", 1)
    counts["min_rows_per_split"] = min(len(frame) for frame in splits.values())
    return [
        Check(check_name, not findings[check_name], counts[check_name], _gx_threshold(check_name, cfg),
              f"GX: {message}" + (f" ({counts[check_name]} unexpected)" if findings[check_name] else ""),
              evidence=findings[check_name][: cfg.evidence_rows])
        for check_name, message in dict(GX_CHECKS.values()).items()
    ]


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

def label_conflicts(rows: pd.DataFrame, cfg: ValidationConfig) -> Check:
    """The same folded text with two labels: one of them is wrong, and the model learns noise."""
    labelled = rows.dropna(subset=["key", "label"])
    conflicting = labelled.groupby("key")["label"].nunique()
    conflicting = conflicting[conflicting > 1].index
    groups = [group for _, group in labelled[labelled["key"].isin(conflicting)].groupby("key", sort=False)]
    return Check("label_conflicts", not groups, len(groups), 0,
              f"{len(groups)} normalised texts carry more than one label",
              evidence=[_places(group) for group in groups[: cfg.evidence_rows]])


def class_balance(rows: pd.DataFrame, cfg: ValidationConfig) -> list[Check]:
    counts = rows.loc[rows["split"] == "train", "label"].dropna().astype(str).value_counts().sort_index()
    per_class = {label: int(count) for label, count in counts.items()}
    ratio = round(float(counts.max() / counts.min()), 3) if len(counts) else 0.0
    rare = {label: count for label, count in per_class.items() if count < cfg.min_class_rows}
    total = int(len(rows))
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


def label_coverage(rows: pd.DataFrame, labels: list[str]) -> list[Check]:
    """Every label in test (no verdict is possible for a class without test rows) and, as a warning, in validation."""
    checks = []
    for split, severity in (("test", "error"), ("validation", "warning")):
        missing = sorted(set(labels) - set(rows.loc[rows["split"] == split, "label"]))
        reason = (f"{split} has no rows of {', '.join(map(repr, missing))}: add rows of that class or change data.split_salt"
                  if missing else f"every label has {split} rows")
        checks.append(Check(f"{split}_label_coverage", not missing, len(missing), 0, reason, severity=severity,
                            evidence=[{"split": split, "label": label} for label in missing]))
    return checks


def exact_duplicates(rows: pd.DataFrame, cfg: ValidationConfig) -> list[Check]:
    """Groups of rows with the same folded text: across splits (leakage, an error) and within one split."""
    keyed = rows.dropna(subset=["key"])
    repeated = keyed[keyed.duplicated("key", keep=False)]
    spread = repeated.groupby("key")["split"].nunique()
    leaked_keys = spread[spread > 1].index
    leaked = repeated[repeated["key"].isin(leaked_keys)]
    leak_groups = [group for _, group in leaked.groupby("key", sort=False)]
    leaked_rows = int(leaked.groupby("key").apply(lambda g: (g["split"] != g["split"].iloc[0]).sum(), include_groups=False).sum()) if len(leaked) else 0
    all_groups = repeated["key"].nunique()
    within = repeated[repeated.duplicated(["key", "split"], keep=False)]
    within_groups = [group for _, group in within.groupby(["key", "split"], sort=False)]
    return [
        Check("exact_leakage", not leak_groups, len(leak_groups), 0,
              f"{len(leak_groups)} of {all_groups} groups of identical normalised texts span splits "
              f"({leaked_rows} rows beyond their first split)",
              evidence=[_places(g) for g in leak_groups[: cfg.evidence_rows]]),
        Check("duplicates_within_split", not within_groups, len(within_groups), 0,
              f"{len(within_groups)} normalised texts repeat inside one split (they weigh double in training/metrics)",
              severity="warning", evidence=[_places(g) for g in within_groups[: cfg.evidence_rows]]),
    ]


# --- near-duplicates: MinHash LSH, each candidate verified by its true Jaccard ------------------------

def shingles(folded: str, size: int) -> set[bytes]:
    """Character n-grams, as bytes: UTF-32 gives every character 4 bytes, so slicing the encoded text once is exact."""
    data, width = folded.encode("utf-32-le"), 4 * size
    return {data[i : i + width] for i in range(0, len(data) - width + 4, 4)} or {data}


def near_duplicate_pairs(rows: pd.DataFrame, cfg: ValidationConfig) -> NearDuplicates:
    """Pairs of rows with distinct folded texts whose shingle Jaccard ≥ validation.near_dup_jaccard.

    Work and memory per text are bounded: a large LSH bucket (boilerplate) pairs each text with BUCKET_CAP
    neighbours only, and says so (`capped`); candidates the signatures already rule out are never verified."""
    from datasketch import LeanMinHash, MinHashLSH

    unique = rows.dropna(subset=["key"]).drop_duplicates("key")
    unique = unique[unique["folded"].str.len() <= cfg.max_text_chars]  # oversize texts already fail text_length
    texts = unique["folded"].tolist()
    hashvalues = signatures(texts, cfg)
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=lsh_bands(cfg.near_dup_jaccard, cfg.num_perm))
    with lsh.insertion_session() as session:
        for index, values in enumerate(hashvalues):
            session.insert(index, LeanMinHash(seed=1, hashvalues=values, scheme="affine32"), check_duplication=False)
    first, second, capped = candidate_pairs(lsh, texts)
    first, second = likely_pairs(hashvalues, first, second, cfg)
    sets = {index: shingles(texts[index], cfg.shingle_chars) for index in np.unique(np.concatenate([first, second])).tolist()}
    similar = []
    for i, j in zip(first.tolist(), second.tolist()):
        jaccard = len(sets[i] & sets[j]) / len(sets[i] | sets[j])
        if jaccard >= cfg.near_dup_jaccard:
            similar.append((i, j, jaccard))
    keys = unique["key"].tolist()
    wanted = {keys[index] for pair in similar for index in pair[:2]}
    places: dict[str, list[tuple[str, int]]] = {}
    for key, split, row in rows.loc[rows["key"].isin(wanted), ["key", "split", "row"]].itertuples(index=False):
        places.setdefault(key, []).append((split, int(row)))
    found = NearDuplicates(Pair(a, b, round(jaccard, 4))
                           for i, j, jaccard in similar for a in places[keys[i]] for b in places[keys[j]])
    found.capped = capped
    return found


def candidate_pairs(lsh: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, int] | None]:
    """Texts that share a bucket in any band (the same answer as querying every text, in one pass), as sorted
    index pairs (first < second), and what the cap cut (None if nothing).

    A bucket of more than BUCKET_CAP + 1 texts (boilerplate: thousands of texts alike) would make this quadratic:
    there each text is paired with its BUCKET_CAP neighbours in folded-text order instead (near-duplicates share
    long runs of text, so they mostly sort close together)."""
    n = len(texts)
    codes = [np.empty(0, dtype=np.int64)]  # first * n + second
    capped_buckets, capped_texts, largest = 0, set(), 0
    for band in lsh.hashtables:
        for bucket in band.keys():
            members = band.get(bucket)
            if len(members) < 2:
                continue
            if len(members) <= BUCKET_CAP + 1:
                members = np.fromiter(members, dtype=np.int64, count=len(members))
                a, b = (members[side] for side in np.triu_indices(len(members), 1))
            else:
                capped_buckets, largest = capped_buckets + 1, max(largest, len(members))
                capped_texts.update(members)
                ordered = np.array(sorted(members, key=texts.__getitem__), dtype=np.int64)
                a = np.concatenate([ordered[:-offset] for offset in range(1, BUCKET_CAP + 1)])
                b = np.concatenate([ordered[offset:] for offset in range(1, BUCKET_CAP + 1)])
            codes.append(np.minimum(a, b) * n + np.maximum(a, b))
    first, second = np.divmod(np.unique(np.concatenate(codes)), n)
    capped = ({"buckets": capped_buckets, "largest_bucket": largest, "texts": len(capped_texts), "neighbours_per_text": BUCKET_CAP}
              if capped_buckets else None)
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
    for rows in range(num_perm // 2, 0, -1):  # datasketch needs at least 2 bands
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= 0.99:
            return bands, rows
    return num_perm, 1


def _signatures(texts: list[str], size: int, num_perm: int) -> np.ndarray:
    generator = MinHash.generator((shingles(text, size) for text in texts), num_perm=num_perm, hashfunc=zlib.crc32)
    return np.array([minhash.hashvalues for minhash in generator], dtype=np.uint32).reshape(len(texts), num_perm)


def signatures(texts: list[str], cfg: ValidationConfig) -> np.ndarray:
    """MinHash signatures of character shingles; large inputs are split over the CPU cores (forked workers)."""
    workers = min(os.cpu_count() or 1, 8) if len(texts) >= PARALLEL_FROM else 1
    if workers == 1:
        return _signatures(texts, cfg.shingle_chars, cfg.num_perm)
    chunks = [texts[start : start + len(texts) // workers + 1] for start in range(0, len(texts), len(texts) // workers + 1)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        parts = pool.map(_signatures, chunks, repeat(cfg.shingle_chars), repeat(cfg.num_perm))
        return np.concatenate(list(parts))


def near_duplicate_checks(rows: pd.DataFrame, pairs: list[Pair], cfg: ValidationConfig) -> list[Check]:
    indexed = rows.set_index(["split", "row"])
    label_of = dict(zip(zip(rows["split"], rows["row"].astype(int).tolist()), rows["label"]))
    across = [pair for pair in pairs if pair.a[0] != pair.b[0]]
    conflicting = [pair for pair in pairs if label_of[pair.a] != label_of[pair.b]]
    within = [pair for pair in pairs if pair.a[0] == pair.b[0]]
    rule = f"character {cfg.shingle_chars}-gram Jaccard ≥ {cfg.near_dup_jaccard:g}"
    capped = getattr(pairs, "capped", None)
    if capped:
        rule += (f"; search capped in {capped['buckets']} LSH buckets of up to {capped['largest_bucket']} alike texts, "
                 f"each compared with {capped['neighbours_per_text']} neighbours: a lower bound")

    def evidence(found: list[Pair]) -> list[dict[str, Any]]:
        noted = [{"search_capped": capped}] if capped else []
        return (noted + [_pair(indexed, pair) for pair in found[: cfg.evidence_rows]])[: cfg.evidence_rows]

    return [
        Check("near_dup_leakage", len(across) <= cfg.max_near_dup_leak, len(across), cfg.max_near_dup_leak,
              f"{len(across)} near-duplicate pairs across splits ({rule})", evidence=evidence(across)),
        Check("near_dup_label_conflicts", not conflicting, len(conflicting), 0,
              f"{len(conflicting)} near-duplicate pairs carry different labels ({rule})",
              severity="warning", evidence=evidence(conflicting)),
        Check("near_dup_within_split", not within, len(within), 0,
              f"{len(within)} near-duplicate pairs inside one split ({rule})",
              severity="info", evidence=evidence(within)),
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


def _places(group: pd.DataFrame) -> list[dict[str, Any]]:
    return [_place(*values) for values in group[["split", "row", "label", "text"]].itertuples(index=False)]


def _pair(indexed: pd.DataFrame, pair: Pair) -> dict[str, Any]:
    a, b = indexed.loc[pair.a], indexed.loc[pair.b]
    return {"similarity": pair.similarity, "a": _place(*pair.a, a["label"], a["text"]), "b": _place(*pair.b, b["label"], b["text"])}
