"""Property-based fuzzing of ingest's readers (hypothesis): whatever the bytes, ingest either succeeds or raises
InputError with one line — never another exception. Inputs start from a valid table and get corrupted, so that
both outcomes are exercised (the last test checks that they are)."""

import io
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.ingest import ingest
from tuneflow.config import DataConfig
from tuneflow.errors import InputError

EXAMPLES = int(os.environ.get("TUNEFLOW_FUZZ_EXAMPLES", "150"))  # per test; raise it for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
outcomes = {"ok": 0, "refused": 0}

cells = st.text(alphabet=st.sampled_from(list('ab ,;\t"\'\\\r\n{}[]:0.é€\ufeff\x00')), max_size=10)
labels = st.sampled_from(["a", "b", "c", " a ", "", "NaN", "1", "1.0", '"b"'])
options = st.just({}) | st.fixed_dictionaries({}, optional={
    "dedup": st.booleans(), "sample": st.integers(1, 40), "max_invalid_fraction": st.sampled_from([0.0, 0.5, 1.0]),
    "text_column": st.sampled_from([0, 1, "text", "body"]), "label_column": st.sampled_from([0, 1, "label"]),
    "encoding": st.sampled_from(["utf-8", "latin-1", "utf-16", "zlib", "no-such-codec"]),
    "slice_columns": st.sampled_from([["site"], ["extra"]]),
})


def attempt(content: bytes, name: str, **data) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            ingest(DataConfig(source=str(path), **data), Path(folder) / "out")
        except InputError as error:
            assert "\n" not in str(error)
            outcomes["refused"] += 1
        else:
            outcomes["ok"] += 1


@st.composite
def valid_rows(draw) -> list[tuple[str, str]]:
    """A table ingest accepts: distinct texts, two classes of at least 3 rows."""
    count = draw(st.integers(6, 24))
    return [(f"text {index} {draw(st.sampled_from(['one', 'two', 'three']))}", "ab"[index % 2]) for index in range(count)]


@st.composite
def corrupted(draw, rows: list[tuple[str, str]], render) -> bytes:
    """`rows` rendered, then some lines replaced or inserted, some bytes flipped, maybe a BOM and CRLF."""
    lines = render(rows)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(lines)))
        garbage = draw(st.one_of(cells, st.builds(lambda t, l: f"{t},{l}", cells, labels), st.builds(json.dumps, cells)))
        if draw(st.booleans()) and at < len(lines):
            lines[at] = garbage
        else:
            lines.insert(at, garbage)
    raw = (draw(st.sampled_from(["\n", "\r\n"]))).join(lines).encode("utf-8")
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xe9", b"\xc3", b"\x00", b'"', b"\n"])) + raw[at + 1:]
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + raw


def as_csv(separator: str):
    def render(rows):
        return [separator.join(["text", "label", "site"])] + [separator.join([text, label, "web"]) for text, label in rows]
    return render


def as_jsonl(rows):
    return [json.dumps({"text": text, "label": label, "site": None if index % 3 else 7}) for index, (text, label) in enumerate(rows)]


@st.composite
def delimited_files(draw):
    separator, name = draw(st.sampled_from([(",", "data.csv"), ("\t", "data.tsv"), ("\t", "data.txt"), (";", "data.csv")]))
    return draw(corrupted(draw(valid_rows()), as_csv(separator))), name


@FUZZ
@given(delimited_files(), st.sampled_from(["auto", "csv", "tsv"]), options)
def test_delimited_text_succeeds_or_is_refused_in_one_line(file, chosen, data):
    attempt(*file, format=chosen, **data)


@FUZZ
@given(valid_rows().flatmap(lambda rows: corrupted(rows, as_jsonl)), st.sampled_from(["data.jsonl", "data.txt"]), options)
def test_jsonl_succeeds_or_is_refused_in_one_line(content, name, data):
    attempt(content, name, format="jsonl" if name.endswith(".txt") else "auto", **data)


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(["data.csv", "data.tsv", "data.jsonl", "data.parquet", "data.bin"]),
       st.sampled_from(["auto", "csv", "tsv", "jsonl", "parquet", "folder"]), options)
def test_arbitrary_bytes_succeed_or_are_refused_in_one_line(content, name, chosen, data):
    attempt(content, name, format=chosen, **data)


parquet_columns = st.one_of(
    st.lists(st.text(max_size=6), min_size=8, max_size=8), st.lists(st.integers(-2, 2), min_size=8, max_size=8),
    st.lists(st.floats(), min_size=8, max_size=8), st.lists(st.none() | st.sampled_from(["a", "b"]), min_size=8, max_size=8),
    st.lists(st.lists(st.integers(-9, 9), max_size=2), min_size=8, max_size=8), st.lists(st.binary(max_size=3), min_size=8, max_size=8),
    st.just([f"text {index}" for index in range(8)]), st.just(list("abababab")))


@st.composite
def parquet_files(draw) -> bytes:
    columns = draw(st.lists(st.tuples(st.sampled_from(["text", "label", "site", "x"]), parquet_columns), max_size=4))
    table = pa.table([pa.array(values) for _, values in columns], names=[name for name, _ in columns])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    raw = sink.getvalue()
    if draw(st.booleans()):  # damage a byte
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:]
    return raw


@FUZZ
@given(parquet_files(), options)
def test_parquet_succeeds_or_is_refused_in_one_line(content, data):
    attempt(content, "data.parquet", **data)


def test_the_fuzzing_reached_both_outcomes():
    """Runs after the fuzz tests above (pytest keeps file order): a fuzzer that never gets past the readers, or
    never fails them, would test nothing."""
    if not sum(outcomes.values()):
        pytest.skip("run with the fuzz tests above")
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes
