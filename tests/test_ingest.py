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
