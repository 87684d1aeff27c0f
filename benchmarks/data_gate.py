"""Data gate at scale (not a test): synthetic splits built from MR polarity texts with injected duplicates.

    flock /tmp/tuneflow-heavy.lock .venv/bin/python benchmarks/data_gate.py [--exact-rows 1000000] [--near-rows 100000]

Measures, side by side in one run:
- exact checks (GX suites, label conflicts, class balance, exact leakage / within-split duplicates) on 1,000,000 rows;
- near-duplicate leakage (MinHash LSH + exact Jaccard verification) on 100,000 rows: time, recall of injected
  one-word edits, and what it reports on the same data without injections (must be nothing);
- the naive O(n²) all-pairs Jaccard on a 5,000-row sample against LSH on the same sample.
Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.gate_checks import (  # noqa: E402
    class_balance,
    exact_duplicates,
    gx_checks,
    label_conflicts,
    naive_near_duplicate_pairs,
    near_duplicate_checks,
    near_duplicate_pairs,
    shingles,
    table,
)
from tuneflow.config import ValidationConfig  # noqa: E402
from tuneflow.text import fold  # noqa: E402

MR_CSV = REPO.parent / "shared" / "datasets" / "mr-polarity" / "mr.csv"
LABELS = ["negative", "positive"]
SHARES = {"train": 0.7, "validation": 0.1, "test": 0.2}


def distinct_snippets(mr: pd.DataFrame, cfg: ValidationConfig) -> pd.DataFrame:
    """MR snippets without exact or near-duplicates among themselves, shortest first."""
    mr = mr.assign(folded=mr["text"].map(fold)).drop_duplicates("folded").reset_index(drop=True)
    near = {j for _, j, _ in naive_near_duplicate_pairs(mr["folded"].tolist(), cfg)}
    mr = mr.drop(index=sorted(near))
    return mr.assign(length=mr["folded"].str.len()).sort_values("length", kind="stable").reset_index(drop=True)


def synthetic(snippets: pd.DataFrame, rows: int, rng: random.Random) -> pd.DataFrame:
    """`rows` short reviews, each two distinct MR snippets of similar length (neither over 60% of the text).

    Two such texts share at most one snippet, so their Jaccard stays far below 0.8: the data is clean.
    """
    texts, labels, lengths = snippets["text"].tolist(), snippets["label"].tolist(), snippets["length"].tolist()
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < rows:
        i = rng.randrange(len(texts))
        j = min(len(texts) - 1, i + rng.randint(1, 400))
        if i != j and (i, j) not in seen and max(lengths[i], lengths[j]) <= 1.5 * min(lengths[i], lengths[j]):
            seen.add((i, j))
            first, second = (i, j) if rng.random() < 0.5 else (j, i)
            out.append((f"{texts[first]} {texts[second]}", labels[first]))
    return pd.DataFrame(out, columns=["text", "label"]).sample(frac=1, random_state=rng.randrange(2**31)).reset_index(drop=True)


def split(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    a = int(len(frame) * SHARES["train"])
    b = a + int(len(frame) * SHARES["validation"])
    return {"train": frame.iloc[:a].reset_index(drop=True), "validation": frame.iloc[a:b].reset_index(drop=True),
            "test": frame.iloc[b:].reset_index(drop=True)}


def one_word_changed(text: str, rng: random.Random) -> str:
    words = text.split()
    position = rng.randrange(len(words))
    words[position] = rng.choice(["truly", "really", "quite", "rather", "simply"])
    return " ".join(words)


def inject(splits: dict[str, pd.DataFrame], count: int, rng: random.Random, edit) -> tuple[dict[str, pd.DataFrame], list[tuple[int, str, int]]]:
    """Overwrite `count` validation/test rows with edited copies of train rows; returns (train row, split, row)."""
    splits = {name: frame.copy() for name, frame in splits.items()}
    sources = rng.sample(range(len(splits["train"])), count)
    injected = []
    for n, source in enumerate(sources):
        target = "validation" if n % 3 == 0 else "test"
        row = rng.randrange(len(splits[target]))
        while any(t == target and r == row for _, t, r in injected):
            row = rng.randrange(len(splits[target]))
        splits[target].loc[row, ["text", "label"]] = [edit(splits["train"].at[source, "text"], rng), splits["train"].at[source, "label"]]
        injected.append((source, target, row))
    return splits, injected


def exact_checks(splits: dict[str, pd.DataFrame], cfg: ValidationConfig) -> tuple[float, list]:
    start = time.perf_counter()
    rows = table(splits)
    checks = [*gx_checks(splits, rows, LABELS, cfg), label_conflicts(rows, cfg), *class_balance(rows, cfg), *exact_duplicates(rows, cfg)]
    return time.perf_counter() - start, checks


def near_checks(splits: dict[str, pd.DataFrame], cfg: ValidationConfig) -> tuple[float, list, list]:
    start = time.perf_counter()
    rows = table(splits)
    pairs = near_duplicate_pairs(rows, cfg)
    checks = near_duplicate_checks(rows, pairs, cfg)
    return time.perf_counter() - start, pairs, checks


def jaccard(a: str, b: str, cfg: ValidationConfig) -> float:
    x, y = shingles(fold(a), cfg.shingle_chars), shingles(fold(b), cfg.shingle_chars)
    return len(x & y) / len(x | y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exact-rows", type=int, default=1_000_000)
    parser.add_argument("--near-rows", type=int, default=100_000)
    parser.add_argument("--naive-rows", type=int, default=5_000)
    parser.add_argument("--inject", type=int, default=2_000, help="near-duplicates injected across splits")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    cfg, rng = ValidationConfig(), random.Random(0)
    mr = distinct_snippets(pd.read_csv(MR_CSV), cfg)
    warm = split(mr.head(300)[["text", "label"]])
    gx_checks(warm, table(warm), LABELS, cfg)  # import GX once so its ~5 s start-up is not in the timings below
    table_rows: list[tuple[str, str, str]] = []

    # 1. exact checks on 1M rows with injected exact duplicates (case/space variants of train rows)
    big = split(synthetic(mr, args.exact_rows, rng))
    big, exact_injected = inject(big, args.inject, rng, lambda text, _: "  " + text.upper() + " ")
    seconds, checks = exact_checks(big, cfg)
    found = {check.name: check for check in checks}
    table_rows.append((f"exact checks, {args.exact_rows:,} rows (GX suites + fold/hash + conflicts + balance + leakage)",
                       f"{seconds:.1f} s", "≤ 60 s"))
    table_rows.append(("  exact leakage groups found / injected", f"{found['exact_leakage'].value:,} / {len(exact_injected):,}", "all"))
    del big

    # 2. near-duplicate leakage on 100k rows: clean, then with one-word edits injected
    clean = split(synthetic(mr, args.near_rows, rng))
    seconds_clean, clean_pairs, clean_checks = near_checks(clean, cfg)
    leaks_clean = next(check for check in clean_checks if check.name == "near_dup_leakage").value
    dirty, injected = inject(clean, args.inject, rng, one_word_changed)
    seconds_dirty, pairs, _ = near_checks(dirty, cfg)
    truth = [(("train", source), (target, row)) for source, target, row in injected
             if jaccard(dirty["train"].at[source, "text"], dirty[target].at[row, "text"], cfg) >= cfg.near_dup_jaccard]
    reported = {frozenset((pair.a, pair.b)) for pair in pairs}
    recall = sum(frozenset(pair) in reported for pair in truth) / len(truth)
    verified_ok = all(pair.similarity >= cfg.near_dup_jaccard for pair in pairs)
    table_rows += [
        (f"near-dup leakage, {args.near_rows:,} rows, clean (MinHash LSH, {cfg.num_perm} perms, {cfg.shingle_chars}-grams)", f"{seconds_clean:.1f} s", "≤ 30 s"),
        ("  leakage pairs reported on clean data", f"{leaks_clean}", "0"),
        (f"near-dup leakage, {args.near_rows:,} rows, {args.inject:,} one-word edits injected", f"{seconds_dirty:.1f} s", "≤ 30 s"),
        (f"  recall of injected pairs with true Jaccard ≥ {cfg.near_dup_jaccard} ({len(truth):,} of {len(injected):,})", f"{recall:.4f}", "≥ 0.95"),
        ("  reported pairs below the Jaccard threshold (false positives)", "0" if verified_ok else "SOME", "0"),
    ]

    # 3. naive O(n²) vs LSH on the same sample
    sample = pd.concat(dirty.values(), ignore_index=True).sample(args.naive_rows, random_state=0).reset_index(drop=True)
    texts = [fold(text) for text in sample["text"]]
    start = time.perf_counter()
    naive = naive_near_duplicate_pairs(texts, cfg)
    naive_s = time.perf_counter() - start
    one = {"train": sample, "validation": sample.iloc[:0], "test": sample.iloc[:0]}
    lsh_s, lsh_pairs, _ = near_checks(one, cfg)
    naive_set = {(i, j) for i, j, _ in naive}
    lsh_set = {tuple(sorted((pair.a[1], pair.b[1]))) for pair in lsh_pairs}
    agreement = len(naive_set & lsh_set) / len(naive_set) if naive_set else 1.0
    pairs_total = args.naive_rows * (args.naive_rows - 1) // 2
    table_rows += [
        (f"naive all-pairs Jaccard, {args.naive_rows:,} rows ({pairs_total:,} pairs)", f"{naive_s:.1f} s", "reference"),
        (f"MinHash LSH on the same {args.naive_rows:,} rows", f"{lsh_s:.2f} s", f"{naive_s / lsh_s:.0f}× faster"),
        ("  pairs found: naive / LSH (LSH share of naive's)", f"{len(naive_set)} / {len(lsh_set)} ({agreement:.3f})", "recall ≥ 0.95"),
    ]

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, MinHash signatures on a {os.cpu_count()}-process forked pool"
    lines = [f"## Data gate at scale — {stamp}", "", f"Machine: {machine}; command `python benchmarks/data_gate.py`; "
             "texts are pairs of MR polarity snippets (≈ 230 characters), splits 70/10/20.", "",
             "| measure | value | target |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in table_rows]
    block = "\n".join(lines) + "\n"
    print(block)
    with args.results.open("a", encoding="utf-8") as results:
        results.write("\n" + block)


if __name__ == "__main__":
    main()
