"""The data gate at scale: memory far below the data, and repeated texts (data.dedup=false) never multiplied out."""

import random

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.gate_checks as gate_checks
from tasks.validate import fix_splits, run_checks, validate
from tuneflow.config import ValidationConfig

LABELS = ["money", "music", "sport"]


def random_text(rng, words):
    return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(words))


def write_splits(folder, frames, row_group=500):
    folder.mkdir()
    for name, frame in frames.items():
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / f"{name}.parquet", row_group_size=row_group)
    (folder / "data_card.json").write_text(pd.Series({"labels": LABELS, "data_hash": "ingest"}).to_json())
    return folder


@pytest.mark.slow  # ~80 s on a loaded 2-core machine: tracemalloc slows MinHash several times
def test_the_gate_keeps_python_memory_far_below_the_data_size(tmp_path, monkeypatch):
    """tracemalloc sees Python objects and numpy buffers. The gate used to hold every raw and folded text as a Python
    string (its peak grew by over 2× the texts' size); now it reads CHUNK_ROWS rows at a time and keeps a few numbers
    and a MinHash signature per row. Fixed costs (GX's caches, one chunk, one text's MinHash) are the same at any
    size, so the test compares how the peak grows from 300 to 1,200 texts with how the texts grow."""
    import tracemalloc

    monkeypatch.setattr(gate_checks, "CHUNK_ROWS", 100)
    monkeypatch.setattr(gate_checks, "SIGNATURE_BLOCK", 100)
    rng = random.Random(0)
    texts = [random_text(rng, 330) for _ in range(1_200)]  # about 2,000 characters each
    frame = pd.DataFrame({"text": texts, "label": [LABELS[index % 3] for index in range(len(texts))]})

    def peak_of(rows):
        part = frame.iloc[:rows]
        first, second = int(rows * 0.7), int(rows * 0.85)
        data_dir = write_splits(tmp_path / f"data{rows}", {"train": part.iloc[:first], "validation": part.iloc[first:second],
                                                           "test": part.iloc[second:]}, row_group=100)
        tracemalloc.start()
        try:
            result = validate(data_dir, ValidationConfig(), tmp_path / f"gate{rows}")
            return tracemalloc.get_traced_memory()[1], result
        finally:
            tracemalloc.stop()

    peak_of(30)  # GX's imports and caches are not the gate's data
    small, _ = peak_of(300)
    large, result = peak_of(1_200)
    assert {check.name for check in result.checks} >= {"text_length", "exact_leakage", "near_dup_leakage"}
    assert len(pd.read_parquet(tmp_path / "gate1200" / "data" / "train.parquet")) == 840
    growth = sum(map(len, texts[300:]))
    assert large - small < growth / 3, (large - small, growth)


def test_a_text_repeated_many_times_is_one_group_counted_not_multiplied(monkeypatch):
    """With data.dedup=false a text can repeat k times: one near-duplicate pair of texts is k × k' row pairs. They
    are counted from the group and only the evidence rows are ever built."""
    text = "the central bank raised interest rates again this quarter as inflation kept climbing across the region"
    near = text.replace("again", "sharply")
    rng = random.Random(1)
    fillers = [random_text(rng, 12) for _ in range(60)]
    train = pd.DataFrame({"text": [text] * 300 + fillers,
                          "label": ["money"] * 150 + ["sport"] * 150 + [LABELS[i % 3] for i in range(len(fillers))]})
    test = pd.DataFrame({"text": [near] * 200 + ["another unrelated sentence"], "label": ["money"] * 201})
    splits = {"train": train, "validation": train.iloc[:0], "test": test}
    built = []

    class CountedPair(gate_checks.Pair):
        def __post_init__(self):
            built.append(1)

    monkeypatch.setattr(gate_checks, "Pair", CountedPair)
    checks, rows, pairs = run_checks(splits, LABELS, ValidationConfig(evidence_rows=5))
    by_name = {check.name: check for check in checks}
    assert len(pairs.groups) == 1 and len(pairs) == 300 * 200
    assert by_name["near_dup_leakage"].value == 300 * 200 and len(by_name["near_dup_leakage"].evidence) == 5
    assert by_name["near_dup_label_conflicts"].value == 150 * 200  # the 150 train rows labelled 'sport' × 200 'money'
    first = by_name["near_dup_label_conflicts"].evidence[0]
    assert (first["a"]["row"], first["a"]["label"], first["b"]["row"], first["b"]["label"]) == (150, "sport", 0, "money")
    assert by_name["near_dup_within_split"].value == 0 and by_name["duplicates_within_split"].value == 2
    assert len(built) <= 3 * 5  # the evidence pairs, never the 60,000
    removed, dropped = fix_splits(rows, pairs)
    assert dropped == {"test": set(range(200))} and len(built) <= 3 * 5
    similarity = by_name["near_dup_leakage"].evidence[0]["similarity"]
    assert {item["reason"] for item in removed} == {f"near_dup_leakage: Jaccard {similarity:g} with train row 0"}


def test_group_counts_and_evidence_equal_the_pairs_one_by_one():
    """The per-group arithmetic (splits × labels) against every row pair enumerated, on repeats spread over splits
    and labels; and `fix` picks for each row the partner the pair-by-pair walk would."""
    text = "the central bank raised interest rates again this quarter as inflation kept climbing across the region"
    near = text.replace("again", "sharply")
    rows_of = {"train": [(text, "money"), (near, "sport"), ("a quiet unrelated line about gardens", "music")],
               "validation": [(near, "money"), (text, "money"), (near, "sport")],
               "test": [(text, "sport"), (near, "money"), (text, "money")]}
    splits = {name: pd.DataFrame(items, columns=["text", "label"]) for name, items in rows_of.items()}
    checks, rows, pairs = run_checks(splits, LABELS, ValidationConfig(evidence_rows=50))
    every = list(pairs)
    assert len(every) == len(pairs) == 4 * 4  # 4 rows of each text
    label = {(name, row): value for name, frame in splits.items() for row, value in enumerate(frame["label"])}
    expected = {"near_dup_leakage": [p for p in every if p.a[0] != p.b[0]],
                "near_dup_label_conflicts": [p for p in every if label[p.a] != label[p.b]],
                "near_dup_within_split": [p for p in every if p.a[0] == p.b[0]]}
    for name, found in expected.items():
        check = next(check for check in checks if check.name == name)
        assert check.value == len(found), name
        assert [(item["a"]["split"], item["a"]["row"], item["b"]["split"], item["b"]["row"]) for item in check.evidence] == [
            (*p.a, *p.b) for p in found], name
    order = {"train": 0, "validation": 1, "test": 2}
    reasons = {}
    for pair in every:  # the pair-by-pair walk fix_splits used to do
        if pair.a[0] != pair.b[0]:
            earlier, later = sorted((pair.a, pair.b), key=lambda place: order[place[0]])
            reasons.setdefault(later, f"near_dup_leakage: Jaccard {pair.similarity:g} with {earlier[0]} row {earlier[1]}")
    removed, _ = fix_splits(rows, pairs)
    assert {(item["split"], item["row"]): item["reason"] for item in removed if item["reason"].startswith("near")} == {
        place: reason for place, reason in reasons.items() if place[0] != "train" and place not in
        {(item["split"], item["row"]) for item in removed if not item["reason"].startswith("near")}}
