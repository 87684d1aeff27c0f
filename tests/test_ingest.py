import json

import pandas as pd
import pytest

from conftest import MR_CSV, needs_mr, topic_frame
from tasks.ingest import ingest
from tuneflow.data import read_splits
from tuneflow.config import DataConfig
from tuneflow.errors import InputError
from tuneflow.text import fold


def run(tmp_path, **data):
    return ingest(DataConfig(**data), tmp_path / "out")


def write_csv(tmp_path, frame, name="data.csv", **options):
    path = tmp_path / name
    frame.to_csv(path, index=False, **options)
    return path


def split_of(data_dir) -> dict[str, str]:
    return {text: name for name, frame in read_splits(data_dir).items() for text in frame["text"]}


def test_csv_roundtrip_deterministic_with_every_class_in_every_split(tmp_path):
    source = write_csv(tmp_path, topic_frame(40))
    first = run(tmp_path, source=str(source))
    splits = read_splits(first.data_dir)
    assert sum(first.counts.values()) == 120
    assert all(set(splits[name]["label"]) == {"sport", "money", "music"} for name in splits)
    again = ingest(DataConfig(source=str(source)), tmp_path / "again")
    assert again.data_hash == first.data_hash
    assert json.loads((first.data_dir / "data_card.json").read_text())["data_hash"] == first.data_hash


def test_stable_split_rows_keep_their_split_as_the_data_grows(tmp_path):
    grown = topic_frame(300)
    small = grown.groupby("label").head(100)  # the first third of every class
    before = split_of(run(tmp_path, source=str(write_csv(tmp_path, small, "small.csv"))).data_dir)
    after = split_of(ingest(DataConfig(source=str(write_csv(tmp_path, grown, "grown.csv"))), tmp_path / "grown").data_dir)
    assert before and all(after[text] == name for text, name in before.items())
    # another salt is another split
    salted = split_of(ingest(DataConfig(source=str(tmp_path / "small.csv"), split_salt="other"), tmp_path / "salted").data_dir)
    assert sum(salted[text] != name for text, name in before.items()) > len(before) // 4


def test_stable_split_is_stratified_in_expectation_and_repeats_share_a_split(tmp_path):
    frame = topic_frame(1000)
    result = run(tmp_path, source=str(write_csv(tmp_path, pd.concat([frame, frame.head(50)]))), dedup=False)
    test = read_splits(result.data_dir)["test"]
    for label, count in test["label"].value_counts().items():
        assert abs(count - 200) < 3 * (1000 * 0.2 * 0.8) ** 0.5, (label, count)  # binomial, 3 sigma
    assert result.card["split"] == {"method": "hash", "salt": "tuneflow", "validation_fraction": 0.1, "test_fraction": 0.2}
    splits = read_splits(result.data_dir)
    places = pd.concat([part.assign(split=name) for name, part in splits.items()]).groupby("text")["split"].nunique()
    assert places.max() == 1  # the 50 repeated texts each sit in one split


def test_dedup_drops_same_text_same_label_but_keeps_conflicts(tmp_path):
    frame = pd.concat([topic_frame(10), pd.DataFrame([
        {"text": "Great GOAL by the team", "label": "sport"},
        {"text": "  great goal   by the TEAM ", "label": "sport"},   # repeat after folding: dropped
        {"text": "great goal by the team", "label": "money"},        # conflicting label: kept for the gate
        {"text": "not good", "label": "money"},
        {"text": "good", "label": "money"},                          # "not good" and "good" stay distinct
    ])])
    result = run(tmp_path, source=str(write_csv(tmp_path, frame)))
    everything = pd.concat(read_splits(result.data_dir).values())
    assert result.card["dropped"]["duplicates"] == 1
    folded = everything.assign(key=everything["text"].map(fold))
    assert sorted(folded[folded["key"] == "great goal by the team"]["label"]) == ["money", "sport"]
    assert {"not good", "good"} <= set(everything["text"])


def test_dedup_off_keeps_repeats(tmp_path):
    frame = pd.concat([topic_frame(10), topic_frame(10).head(5)])
    result = run(tmp_path, source=str(write_csv(tmp_path, frame)), dedup=False)
    assert result.card["dropped"]["duplicates"] == 0 and result.card["rows_kept"] == 35


def test_messy_tsv_bom_crlf_stray_quotes_and_label_whitespace(tmp_path):
    lines = ["text\tlabel"]
    for row in topic_frame(10).itertuples():
        label = f" {row.label} " if row.Index % 3 == 0 else row.label
        lines.append(f"{row.text}\t{label}")
    lines.append('he said "what a goal\tsport')          # stray quote must not swallow the next rows
    lines.append('"a fully quoted ""market"" text"\tmoney')
    path = tmp_path / "data.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    result = run(tmp_path, source=str(path))
    cleaning = result.card["cleaning"]
    assert cleaning["bom_removed"] and cleaning["crlf_line_endings"]
    assert cleaning["labels_whitespace_stripped"] == 10 and cleaning["quotes_unwrapped"] == 1
    assert result.labels == ["money", "music", "sport"]
    texts = set(pd.concat(read_splits(result.data_dir).values())["text"])
    assert 'he said "what a goal' in texts and 'a fully quoted "market" text' in texts
    assert result.card["rows_read"] == 32


def test_headerless_file_by_column_index(tmp_path):
    frame = topic_frame(10)[["label", "text"]]
    source = write_csv(tmp_path, frame, header=False)
    result = run(tmp_path, source=str(source), text_column=1, label_column=0)
    assert result.card["rows_kept"] == 30 and result.labels == ["money", "music", "sport"]


def test_jsonl_parquet_and_folder_sources(tmp_path):
    frame = topic_frame(10)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(record) for record in frame.to_dict("records")) + "\n")
    parquet = tmp_path / "data.parquet"
    frame.rename(columns={"text": "body", "label": "topic"}).to_parquet(parquet)
    folder = tmp_path / "folder"
    for index, row in frame.iterrows():
        (folder / row["label"]).mkdir(parents=True, exist_ok=True)
        (folder / row["label"] / f"{index}.txt").write_text(row["text"])
    hashes = {
        run(tmp_path, source=str(jsonl)).data_hash,
        ingest(DataConfig(source=str(parquet), text_column="body", label_column="topic"), tmp_path / "pq").data_hash,
        ingest(DataConfig(source=str(folder)), tmp_path / "dir").data_hash,
    }
    assert len(hashes) == 1  # same rows, same split, whatever the container


def test_builtin_bbc_counts_duplicates_and_the_one_bad_byte(tmp_path):
    result = run(tmp_path, sample=200)
    card = result.card
    assert card["rows_read"] == 2225 and card["dropped"]["duplicates"] == 101
    assert card["cleaning"]["rows_with_invalid_bytes_replaced"] == 1
    assert card["rows_kept"] == 200 and len(result.labels) == 5


@needs_mr
def test_mr_polarity_sample_is_stratified(tmp_path):
    result = run(tmp_path, source=str(MR_CSV), sample=1000)
    counts = {split: sum(per_class.values()) for split, per_class in result.card["class_counts"].items()}
    assert sum(counts.values()) == 1000
    everything = pd.concat(read_splits(result.data_dir).values())
    assert everything["label"].value_counts().to_dict() == {"negative": 500, "positive": 500}  # data.sample is stratified
    for count in result.card["class_counts"]["train"].values():  # the hash split, per class: binomial, 3 sigma
        assert abs(count - 350) < 3 * (500 * 0.7 * 0.3) ** 0.5


def test_rows_with_empty_text_or_label_are_dropped_and_counted(tmp_path):
    frame = pd.concat([topic_frame(20), pd.DataFrame([{"text": "  ", "label": "sport"}, {"text": "orphan text", "label": ""},
                                                      {"text": "nan label", "label": "NaN"}])])
    result = run(tmp_path, source=str(write_csv(tmp_path, frame)))
    assert result.card["dropped"]["empty_text"] == 1 and result.card["dropped"]["empty_label"] == 2
    assert result.card["rows_kept"] == 60


# --- bad input: one line naming the file/column/key, InputError (exit 2), nothing written ---------


def assert_input_error(tmp_path, match, **data):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match) as error:
        ingest(DataConfig(**data), out)
    assert "\n" not in str(error.value)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_missing_file(tmp_path):
    assert_input_error(tmp_path, r"nope.csv: file not found \(data.source\)", source=str(tmp_path / "nope.csv"))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    assert_input_error(tmp_path, r"data.xlsx: unsupported file type '.xlsx'", source=str(path))


def test_text_column_missing_lists_columns(tmp_path):
    source = write_csv(tmp_path, topic_frame(5).rename(columns={"text": "body"}))
    assert_input_error(tmp_path, r"text column 'text' not found \(data.text_column\); columns found: body, label", source=str(source))


def test_label_column_missing(tmp_path):
    source = write_csv(tmp_path, topic_frame(5))
    assert_input_error(tmp_path, r"label column 'topic' not found \(data.label_column\)", source=str(source), label_column="topic")


def test_empty_dataset(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text,label\n")
    assert_input_error(tmp_path, r"data.csv: no rows after loading", source=str(path))


def test_label_column_with_no_usable_value(tmp_path):
    source = write_csv(tmp_path, topic_frame(5).assign(label=""))
    assert_input_error(tmp_path, r"label column 'label' has no usable value", source=str(source))


def test_single_class(tmp_path):
    source = write_csv(tmp_path, topic_frame(5).assign(label="sport"))
    assert_input_error(tmp_path, r"only one class \('sport'\)", source=str(source))


def test_too_many_invalid_rows(tmp_path):
    frame = topic_frame(5)
    frame.loc[:4, "label"] = ""
    assert_input_error(tmp_path, r"5 of 15 rows have an empty text or label .* data.max_invalid_fraction", source=str(write_csv(tmp_path, frame)))


def test_label_too_rare_to_split(tmp_path):
    frame = pd.concat([topic_frame(10), pd.DataFrame([{"text": "lonely", "label": "rare"}])])
    assert_input_error(tmp_path, r"fewer than 3 rows cannot be split: 'rare' \(1\)", source=str(write_csv(tmp_path, frame)))


def test_binary_junk(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,label\n\x00\x01\x02\xff\xfe binary")
    assert_input_error(tmp_path, r"data.csv: looks binary", source=str(path))


def test_mostly_non_utf8_file_suggests_encoding(tmp_path):
    path = tmp_path / "data.csv"
    body = "text,label\n" + "\n".join(f"caf\xe9 na\xefve {index},{'a' if index % 2 else 'b'}" for index in range(20))
    path.write_bytes(body.encode("latin-1"))
    assert_input_error(tmp_path, r"not valid utf-8 .*set data.encoding", source=str(path))
    result = ingest(DataConfig(source=str(path), encoding="latin-1"), tmp_path / "ok")
    assert "café naïve 0" in set(pd.concat(read_splits(result.data_dir).values())["text"])


def test_broken_jsonl_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{broken\n')
    assert_input_error(tmp_path, r"data.jsonl:2: not valid JSON", source=str(path))


def test_failed_ingest_leaves_previous_artifacts_intact(tmp_path):
    good = run(tmp_path, source=str(write_csv(tmp_path, topic_frame(10))))
    before = (good.data_dir / "data_card.json").read_text()
    with pytest.raises(InputError):
        ingest(DataConfig(source=str(tmp_path / "missing.csv")), good.data_dir)
    assert (good.data_dir / "data_card.json").read_text() == before


def test_hf_source_pools_splits_and_maps_class_labels(tmp_path, monkeypatch):
    """`hf:<name>` goes through datasets.load_dataset (no hub here: it returns a local DatasetDict)."""
    import datasets

    frame = topic_frame(10)
    names = sorted(frame["label"].unique())
    features = datasets.Features({"sentence": datasets.Value("string"), "topic": datasets.ClassLabel(names=names)})
    table = {"sentence": frame["text"].tolist(), "topic": [names.index(label) for label in frame["label"]]}
    full = datasets.Dataset.from_dict(table, features=features)
    loaded = datasets.DatasetDict({"train": full.select(range(0, 20)), "test": full.select(range(20, 30))})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: asked.append(name) or loaded)
    result = run(tmp_path, source="hf:org/topics", text_column="sentence", label_column="topic")
    assert asked == ["org/topics"] and result.labels == names and result.card["rows_kept"] == 30


def test_slice_columns_are_carried_into_every_split_and_a_missing_one_is_named(tmp_path):
    frame = topic_frame(20).assign(site=lambda f: ["web", "print"] * (len(f) // 2))
    frame.loc[3, "site"] = ""
    result = run(tmp_path, source=str(write_csv(tmp_path, frame)), slice_columns=["site"])
    everything = pd.concat(read_splits(result.data_dir).values())
    assert list(everything.columns) == ["text", "label", "site"] and result.card["slice_columns"] == ["site"]
    assert set(everything["site"]) == {"web", "print", "(missing)"}
    from tasks.validate import validate
    from tuneflow.config import ValidationConfig

    gate = validate(result.data_dir, ValidationConfig(min_total_rows=0), tmp_path / "gate")  # the schema includes `site`
    assert gate.passed and pd.read_parquet(tmp_path / "gate" / "data" / "test.parquet").columns.tolist() == ["text", "label", "site"]
    with pytest.raises(InputError, match=r"slice column 'region' not found \(data.slice_columns\); columns found: text, label, site"):
        ingest(DataConfig(source=str(tmp_path / "data.csv"), slice_columns=["region"]), tmp_path / "again")
    folder = tmp_path / "folder" / "sport"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("goal")
    with pytest.raises(InputError, match="a folder source has no columns to slice by"):
        ingest(DataConfig(source=str(tmp_path / "folder"), slice_columns=["site"]), tmp_path / "dir")
    with pytest.raises(ValueError, match="name the splits' own columns"):
        DataConfig(slice_columns=["label"])


# --- data.format, streaming, columns, folders, near-duplicate search cap (issue 15) -------------------------


def test_data_format_reads_a_tab_separated_txt_file(tmp_path):
    frame = topic_frame(10)
    txt = tmp_path / "export.txt"
    frame.to_csv(txt, sep="\t", index=False)
    assert_input_error(tmp_path, r"export.txt: unsupported file type '.txt' .*or set data.format", source=str(txt))
    result = run(tmp_path, source=str(txt), format="tsv")
    assert result.card["format"] == "tsv" and result.card["rows_kept"] == 30
    assert result.data_hash == ingest(DataConfig(source=str(write_csv(tmp_path, frame))), tmp_path / "csv").data_hash
    jsonl = tmp_path / "records.log"
    jsonl.write_text("\n".join(json.dumps(record) for record in frame.to_dict("records")))
    assert ingest(DataConfig(source=str(jsonl), format="jsonl"), tmp_path / "jsonl").data_hash == result.data_hash


@pytest.mark.parametrize("source, chosen, message", [
    ("data.csv", "folder", r"data.csv: is a file, but data.format=folder"),
    ("folder", "csv", r"folder: is a folder, but data.format=csv"),
    ("data.csv", "parquet", r"data.csv: cannot read as Parquet \(.*\) \(data.format=parquet\)"),
    ("data.parquet", "csv", r"data.parquet: looks binary \(NUL bytes\).* \(data.format=csv\)"),
    ("data.csv", "jsonl", r"data.csv:1: not valid JSON \(.*\) \(data.format=jsonl\)"),
    ("builtin:bbc", "tsv", r"data.format=tsv contradicts data.source=builtin:bbc"),
    ("hf:org/topics", "csv", r"data.format=csv does not apply to hf:org/topics"),
])
def test_a_format_that_contradicts_the_source_is_one_line_naming_data_format(tmp_path, source, chosen, message):
    write_csv(tmp_path, topic_frame(5))
    topic_frame(5).to_parquet(tmp_path / "data.parquet")
    (tmp_path / "folder" / "sport").mkdir(parents=True)
    (tmp_path / "folder" / "sport" / "a.txt").write_text("goal")
    path = source if ":" in source else str(tmp_path / source)
    assert_input_error(tmp_path, message, source=path, format=chosen)


def test_chunked_reading_keeps_every_row_across_chunk_boundaries(tmp_path, monkeypatch):
    """Small chunks: rows, dedup across chunks, bad-line numbers and the data hash are those of a whole-file read."""
    import tasks.ingest as module

    frame = pd.concat([topic_frame(12), topic_frame(12).head(9)])  # repeats land in later chunks
    files = {"csv": write_csv(tmp_path, frame), "parquet": tmp_path / "data.parquet", "jsonl": tmp_path / "data.jsonl",
             "tsv": tmp_path / "data.tsv", "folder": tmp_path / "folder"}
    frame.to_parquet(files["parquet"])
    files["jsonl"].write_text("\n".join(json.dumps(record) for record in frame.to_dict("records")))
    files["tsv"].write_bytes(frame.to_csv(sep="\t", index=False).encode().replace(b"number 11 ", b"caf\xe9 number 11 "))
    for index, (text, label) in enumerate(frame.itertuples(index=False)):
        (files["folder"] / label).mkdir(parents=True, exist_ok=True)
        (files["folder"] / label / f"{index}.txt").write_text(text)
    whole = {name: ingest(DataConfig(source=str(path)), tmp_path / f"whole-{name}").card for name, path in files.items()}
    chunks = []
    clean_chunk = module.clean_chunk
    monkeypatch.setattr(module, "clean_chunk", lambda chunk, *args: chunks.append(len(chunk)) or clean_chunk(chunk, *args))
    monkeypatch.setattr(module, "CHUNK_ROWS", 7)
    monkeypatch.setattr(module, "WRITE_ROWS", 5)
    for name, path in files.items():
        chunks.clear()
        card = ingest(DataConfig(source=str(path)), tmp_path / f"chunked-{name}").card
        assert len(chunks) == -(-45 // 7) and sum(chunks) == 45, (name, chunks)  # 45 rows in chunks of 7
        assert card == whole[name] | {"source": card["source"]}, name
        assert card["rows_read"] == 45 and card["dropped"]["duplicates"] == 9
    examples = whole["tsv"]["cleaning"]["invalid_bytes_examples"]  # "number 11" of each class, lines 13, 25, 37
    assert [example.split(" byte")[0] for example in examples] == ["data.tsv:13", "data.tsv:25", "data.tsv:37"]
    assert len({card["data_hash"] for name, card in whole.items() if name != "tsv"}) == 1


def test_streaming_keeps_python_memory_far_below_the_file_size(tmp_path, monkeypatch):
    """tracemalloc sees Python objects and numpy buffers: a whole-file read (bytes, decoded text, a StringIO copy)
    shows up as several times the file; streaming holds one chunk or row group of Python strings at a time (the
    kept texts are Arrow strings, which tracemalloc does not see)."""
    import tracemalloc

    import tasks.ingest as module

    rows = 10_000
    frame = pd.DataFrame({"id": range(rows), "text": [f"review {index} " + "a fairly long sentence " * 10 for index in range(rows)],
                          "label": ["good", "bad"] * (rows // 2), "notes": ["unused column " * 5] * rows})
    source = write_csv(tmp_path, frame)
    monkeypatch.setattr(module, "CHUNK_ROWS", 1_000)
    monkeypatch.setattr(module, "WRITE_ROWS", 1_000)
    tracemalloc.start()
    try:
        result = ingest(DataConfig(source=str(source)), tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.card["rows_kept"] == rows
    assert peak < source.stat().st_size / 2, (peak, source.stat().st_size)  # 0.3× here; a whole-file read 6×


def test_only_the_needed_parquet_columns_are_read(tmp_path):
    """An unused column whose pages are damaged: reading it fails, and ingest never reads it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = topic_frame(10).assign(blob=["x" * 50] * 30)
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, compression="none", use_dictionary=False)
    blob = pq.ParquetFile(path).metadata.row_group(0).column(2)
    assert blob.path_in_schema == "blob"
    raw = bytearray(path.read_bytes())
    raw[blob.data_page_offset : blob.data_page_offset + 16] = b"\xff" * 16  # the page header: undecodable
    path.write_bytes(bytes(raw))
    with pytest.raises(OSError):
        pd.read_parquet(path)
    assert run(tmp_path, source=str(path)).card["rows_kept"] == 30


def test_a_malformed_row_is_refused_not_silently_cut(tmp_path):
    """No usecols: pandas would drop the surplus field of `great, movie,sport` and read the label as ' movie'."""
    path = tmp_path / "data.csv"
    path.write_text(topic_frame(5).to_csv(index=False) + "great, movie,sport\n")
    assert_input_error(tmp_path, r"data.csv: cannot parse as CSV \(.*Expected 2 fields in line 17, saw 3\)", source=str(path))


def test_duplicate_column_names_are_refused_naming_the_column(tmp_path):
    frame = topic_frame(5)
    path = tmp_path / "data.csv"
    path.write_text("text,label,label\n" + "".join(f"{text},{label},{label}\n" for text, label in frame.itertuples(index=False)))
    assert_input_error(tmp_path, r"data.csv: label column 'label' appears 2 times in the header \(data.label_column\)", source=str(path))
    path.write_text("text,x,label,x\n" + "".join(f"{text},1,{label},2\n" for text, label in frame.itertuples(index=False)))
    assert ingest(DataConfig(source=str(path)), tmp_path / "ok").card["rows_kept"] == 15  # a repeated unused column is fine
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x", "label": "y"}\n')
    assert_input_error(tmp_path, r"data.jsonl:2: key 'label' appears more than once", source=str(jsonl))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table([frame["text"], frame["label"], frame["label"]], names=["text", "label", "label"]), parquet)
    assert_input_error(tmp_path, r"data.parquet: label column 'label' appears 2 times", source=str(parquet))


def folder_source(tmp_path):
    folder = tmp_path / "folder"
    for index, (text, label) in enumerate(topic_frame(5).itertuples(index=False)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"{index}.txt").write_text(text)
    return folder


def test_folder_follows_links_inside_it_and_reads_only_regular_txt_files(tmp_path):
    folder = folder_source(tmp_path)
    (folder / "sport" / "again.txt").symlink_to(folder / "music" / "10.txt")  # inside: followed
    (folder / "sport" / "notes.md").write_text("not an example")
    (folder / "sport" / "archive.txt").mkdir()  # a folder named *.txt
    (folder / "alias").symlink_to(folder / "money", target_is_directory=True)
    result = run(tmp_path, source=str(folder), dedup=False)
    texts = pd.concat(read_splits(result.data_dir).values())
    assert result.card["rows_kept"] == 15 + 1 + 5 and set(result.labels) == {"alias", "money", "music", "sport"}
    assert "not an example" not in set(texts["text"])


@pytest.mark.parametrize("make, message", [
    (lambda folder, outside: (folder / "sport" / "leak.txt").symlink_to(outside / "secret.txt"),
     r"folder: sport/leak.txt links to .*secret.txt, outside the folder; links out of data.source are not followed"),
    (lambda folder, outside: (folder / "elsewhere").symlink_to(outside, target_is_directory=True),
     r"folder: elsewhere links to .*outside, outside the folder"),
    (lambda folder, outside: (folder / "sport" / "loop.txt").symlink_to(folder / "sport" / "loop.txt"),
     r"folder: sport/loop.txt is a broken or looping symbolic link \(data.source\)"),
    (lambda folder, outside: ((folder / "a").symlink_to(folder / "b"), (folder / "b").symlink_to(folder / "a")),
     r"folder: a is a broken or looping symbolic link"),
])
def test_folder_refuses_links_that_leave_it_dangle_or_loop(tmp_path, make, message):
    folder = folder_source(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not data")
    make(folder, outside)
    assert_input_error(tmp_path, message, source=str(folder))


def test_near_duplicate_search_caps_a_boilerplate_bucket_and_says_so(tmp_path, monkeypatch):
    """300 alike texts share LSH buckets (44,850 true pairs): in each bucket a text is compared with BUCKET_CAP
    neighbours only, the checks record the cap, and a real near-duplicate elsewhere is still found."""
    import tasks.gate_checks as gate_checks
    from tasks.validate import run_checks
    from tuneflow.config import ValidationConfig

    template = ("thank you for your order, it ships from our warehouse within two working days; track it online "
                "with the reference below and contact support if anything arrives damaged. reference {:04d}")
    boilerplate = pd.DataFrame({"text": [template.format(index) for index in range(300)], "label": "money"})
    leak = "the striker scored twice as the league leaders won again in front of a sold out home crowd tonight"
    frame = pd.concat([topic_frame(40), boilerplate, pd.DataFrame({"text": [leak, leak + " again"], "label": "sport"})])
    data_dir = ingest(DataConfig(source=str(write_csv(tmp_path, frame)), split_salt="a"), tmp_path / "data").data_dir
    monkeypatch.setattr(gate_checks, "BUCKET_CAP", 5)
    found, rows, pairs = run_checks(read_splits(data_dir), ["money", "music", "sport"], ValidationConfig())
    checks = {check.name: check for check in found}
    for name in ("near_dup_leakage", "near_dup_label_conflicts", "near_dup_within_split"):
        assert checks[name].evidence[0]["search_capped"]["neighbours_per_text"] == 5, name
        assert "search capped in" in checks[name].reason and "a lower bound" in checks[name].reason
    capped = checks["near_dup_leakage"].evidence[0]["search_capped"]
    assert capped["largest_bucket"] > 5 and capped["texts"] >= 200, capped
    bands, _ = gate_checks.lsh_bands(0.8, 64)
    assert 300 <= len(pairs) <= 300 * 5 * bands + 1 < 300 * 299 // 2  # linear in the bucket size, not quadratic
    def text(place):
        return rows.texts([rows.position(place)])[0]
    assert any("striker" in text(pair.a) and "striker" in text(pair.b) for pair in pairs)


@pytest.mark.parametrize("rows, sample, match", [
    ([("only one", "rare")], 20, r"fewer than 3 rows cannot be split: 'rare' \(1\)"),  # found by the fuzz tests
    ([], 29, r"data.sample=29 leaves out 1 of 30 rows, fewer than the 3 classes; use at most 27"),
])
def test_a_sample_a_stratified_draw_cannot_make_is_one_line(tmp_path, rows, sample, match):
    frame = pd.concat([topic_frame(10), pd.DataFrame(rows, columns=["text", "label"])])
    assert_input_error(tmp_path, match, source=str(write_csv(tmp_path, frame)), sample=sample)


def test_near_duplicate_candidates_the_signatures_rule_out_are_not_verified(monkeypatch):
    """Texts sharing about a third of their shingles become LSH candidates now and then; their MinHash estimate
    is far below 0.8, so no shingle set is built for an exact check (only the signatures' own)."""
    import random

    import tasks.gate_checks as gate_checks
    from tuneflow.config import ValidationConfig

    common = "the quarterly report from the regional office arrived late again and nobody read it "
    frame = pd.DataFrame({"text": [common + "".join(random.Random(index).choices("abcdefghijklmnopqrstuvwxyz", k=90))
                                   for index in range(200)], "label": "money"})
    rows = gate_checks.table({"train": frame, "validation": frame.iloc[:0], "test": frame.iloc[:0]})
    candidates, built = [], []
    likely_pairs, shingles = gate_checks.likely_pairs, gate_checks.shingles

    def counted(hashvalues, first, second, cfg):
        candidates.append(len(first))
        return likely_pairs(hashvalues, first, second, cfg)

    monkeypatch.setattr(gate_checks, "likely_pairs", counted)
    monkeypatch.setattr(gate_checks, "shingles", lambda *args: built.append(args) or shingles(*args))
    assert gate_checks.near_duplicate_pairs(rows, ValidationConfig()) == []
    assert candidates[0] > 0 and len(built) == 200  # the signatures' shingles, none for an exact check


def test_jsonl_columns_are_named_not_indexed(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in topic_frame(5).to_dict("records")))
    assert_input_error(tmp_path, r"data.jsonl: JSONL records name their fields; data.text_column and data.label_column must be names",
                       source=str(path), text_column=0, label_column=1)
