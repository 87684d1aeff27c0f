"""`model.long_text`: which token windows a too-long text becomes (tuneflow/windows.py), and that the policy a model
was trained with is the one its export, its parity check and `tuneflow serve` use."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from tuneflow import artifacts as a
from tuneflow.config import BUILTIN_MINILM, ModelConfig, Params
from tuneflow.windows import LongText, SampledWindows, Windower, chunk_starts, epoch_draw, pool

WORDS = [f"word{index}" for index in range(400)]  # each one token piece or a few: distinct ids to follow through windows


def numbered(count: int, offset: int = 0) -> str:
    return " ".join(f"{index + offset}" for index in range(count))  # one token per number under the MiniLM vocabulary


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import AutoTokenizer

    from tuneflow.models import resolve_base

    return AutoTokenizer.from_pretrained(resolve_base(BUILTIN_MINILM))


@pytest.fixture(scope="module")
def mpnet_tokenizer(tmp_path_factory):
    """An MPNet tokenizer (<s> … </s>, other ids than BERT's) over the MiniLM word pieces: no hub needed."""
    from transformers import MPNetTokenizerFast

    from tuneflow.models import resolve_base

    folder = tmp_path_factory.mktemp("mpnet-tokenizer")
    pieces = (Path(resolve_base(BUILTIN_MINILM)) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (folder / "vocab.txt").write_text("\n".join(["<s>", "<pad>", "</s>", "<unk>", *pieces, "<mask>"]) + "\n", encoding="utf-8")
    return MPNetTokenizerFast(vocab_file=str(folder / "vocab.txt"))


@pytest.fixture(params=["bert", "mpnet"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def content(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- the windows -----------------------------------------------------------------------------------------------

def test_head_tail_keeps_the_first_and_the_last_tokens_between_the_tokenizers_special_tokens(tokenizer):
    text = numbered(100)
    ids = content(tokenizer, text)
    assert len(ids) == 100
    windows, owner = Windower(tokenizer, LongText("head_tail", 32, head_fraction=0.25)).windows([text])
    (window,) = windows
    budget = 32 - tokenizer.num_special_tokens_to_add(pair=False)  # 30 for both: [CLS] … [SEP], <s> … </s>
    head = int(budget * 0.25)
    assert len(window) == 32 and owner.tolist() == [0]
    assert window == tokenizer.build_inputs_with_special_tokens(ids[:head] + ids[100 - (budget - head):])
    assert window[0] == tokenizer.cls_token_id and window[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(window[1:-1]).split() == [str(n) for n in [*range(head), *range(100 - budget + head, 100)]]


@pytest.mark.parametrize("policy", ["truncate", "head_tail", "chunk"])
def test_a_text_that_fits_gives_the_same_ids_under_every_policy(tokenizer, policy):
    texts = ["a short text", numbered(30)]  # 30 content tokens: exactly the budget of max_length 32
    windows, owner = Windower(tokenizer, LongText(policy, 32, chunk_overlap=8, max_chunks=4)).windows(texts)
    assert windows == tokenizer(texts)["input_ids"] and owner.tolist() == [0, 1]


def test_chunk_windows_overlap_by_the_setting_cover_the_whole_text_and_stop_at_the_cap(tokenizer):
    text = numbered(100)
    ids = content(tokenizer, text)
    windows, owner = Windower(tokenizer, LongText("chunk", 32, chunk_overlap=8, max_chunks=10)).windows(["short", text])
    assert owner.tolist() == [0, 1, 1, 1, 1, 1]
    pieces = [window[1:-1] for window in windows[1:]]
    assert all(tokenizer.build_inputs_with_special_tokens(piece) == window for piece, window in zip(pieces, windows[1:]))
    starts = [0, 22, 44, 66, 70]  # every 30 - 8 tokens; the last window ends at the text's end
    assert pieces == [ids[start : start + 30] for start in starts]
    for left, right in zip(pieces[:-2], pieces[1:-1]):
        assert left[-8:] == right[:8]  # consecutive windows share exactly chunk_overlap tokens ...
    assert pieces[-2][-26:] == pieces[-1][:26]  # ... the last one more, so that it is full
    assert sorted({token for piece in pieces for token in piece}) == sorted(set(ids))  # nothing left out

    capped, capped_owner = Windower(tokenizer, LongText("chunk", 32, chunk_overlap=8, max_chunks=3)).windows([text])
    assert capped == windows[1:4] and capped_owner.tolist() == [0, 0, 0]  # the first max_chunks windows


def test_chunk_starts_cover_every_length_with_at_least_the_overlap():
    for tokens in range(1, 300):
        starts = chunk_starts(tokens, budget=30, overlap=8, max_chunks=1000)
        assert starts[0] == 0 and min(tokens, 30) + starts[-1] == tokens  # from the first token to the last
        gaps = np.diff(starts)
        assert (gaps >= 1).all() and (gaps <= 22).all() and (gaps[:-1] == 22).all()
        assert len(chunk_starts(tokens, 30, 8, max_chunks=2)) == min(2, len(starts))


def test_pool_is_the_mean_of_each_texts_windows_and_leaves_a_single_window_unchanged():
    logits = np.array([[0.1, 0.2], [1.0, 3.0], [3.0, 5.0], [7.0, -1.0], [0.3, 0.7], [-0.4, 0.1]], dtype=np.float32)
    pooled = pool(logits, np.array([0, 1, 1, 2, 2, 2]), 3)
    assert pooled.dtype == np.float32
    np.testing.assert_array_equal(pooled[0], logits[0])
    np.testing.assert_allclose(pooled[1:], [[2.0, 4.0], [(7.0 + 0.3 - 0.4) / 3, (-1.0 + 0.7 + 0.1) / 3]], rtol=1e-6)
    with pytest.raises(ValueError, match="at least one window"):
        pool(logits[:1], np.array([1]), 2)


def test_training_draws_one_window_per_text_afresh_each_epoch_seeded(bert_tokenizer):
    texts = ["short one", numbered(100), numbered(200, offset=500)]
    windows, owner = Windower(bert_tokenizer, LongText("chunk", 32, chunk_overlap=8, max_chunks=8)).windows(texts)
    rows = SampledWindows(windows, owner, labels=[0, 1, 2], seed=7)
    assert len(rows) == 3 and [row["labels"] for row in rows] == [0, 1, 2]

    def drawn(epoch: int) -> list[list[int]]:
        rows.set_epoch(epoch)
        return [rows[index]["input_ids"] for index in range(3)]

    by_epoch = [drawn(epoch) for epoch in range(6)]
    mine = {index: [window for window, text in zip(windows, owner) if text == index] for index in range(3)}
    for epoch in by_epoch:
        assert all(window in mine[index] for index, window in enumerate(epoch))  # a window of its own text
    assert len({tuple(epoch[2]) for epoch in by_epoch}) > 1  # long texts move through their windows
    again = SampledWindows(windows, owner, labels=[0, 1, 2], seed=7)
    again.set_epoch(3)
    assert [again[index]["input_ids"] for index in range(3)] == by_epoch[3]  # seeded: the same draw in another run
    assert rows[1]["attention_mask"] == [1] * len(rows[1]["input_ids"])
    epoch_draw(rows).on_epoch_begin(None, SimpleNamespace(epoch=4.0), None)  # the Trainer's callback at epoch 4
    assert rows.epoch == 4 and [rows[index]["input_ids"] for index in range(3)] == by_epoch[4]
    with pytest.raises(IndexError):
        rows[3]


def test_the_policy_is_validated_and_a_model_recorded_without_one_truncates():
    assert ModelConfig().long_text == "truncate"
    assert ModelConfig(long_text="chunk", max_length=32, chunk_overlap=16).chunk_overlap == 16
    for bad in ({"long_text": "sliding"}, {"long_text": "chunk", "max_length": 32, "chunk_overlap": 17},
                {"head_fraction": 1.5}, {"max_chunks": 0}, {"chunk_overlap": -1}):
        with pytest.raises(ValidationError):
            ModelConfig(**bad)
    assert LongText.from_record(None, 64) == LongText("truncate", 64)
    policy = LongText.of(ModelConfig(long_text="chunk", max_length=64, chunk_overlap=8, max_chunks=3), 64)
    assert LongText.from_record(json.loads(json.dumps(policy.record())), 64) == policy


# --- the model: PyTorch and ONNX pool the same windows ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_classifier(tiny_model):
    """The tiny random BERT with its head scaled up 100x, so that what the encoder reads shows in the logits."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    return model, AutoTokenizer.from_pretrained(tiny_model)


def test_pytorch_logits_are_the_mean_over_the_windows_and_truncate_ignores_the_tail(tiny_classifier):
    import torch

    from tuneflow.trained import predict_logits

    model, tokenizer = tiny_classifier
    shared = numbered(40)
    texts = ["a short text", shared + " " + numbered(60, offset=100), shared + " " + numbered(60, offset=300)]
    chunk = LongText("chunk", 32, chunk_overlap=8, max_chunks=8)
    pooled = predict_logits(model, tokenizer, texts, chunk, batch_size=3)
    windows, owner = Windower(tokenizer, chunk).windows(texts)
    with torch.no_grad():
        one_by_one = np.concatenate([model(input_ids=torch.tensor([window])).logits.numpy() for window in windows])
    assert np.bincount(owner).tolist() == [1, 5, 5]
    np.testing.assert_allclose(pooled, [one_by_one[owner == text].mean(axis=0) for text in range(3)], atol=1e-5)

    truncated = predict_logits(model, tokenizer, texts, LongText("truncate", 32), batch_size=3)
    np.testing.assert_allclose(pooled[0], truncated[0], atol=1e-5)  # one window: chunk is truncate
    # the same first 32 tokens; not bit-equal: on an AMX CPU oneDNN's GEMM rounded two rows of one batch 1e-7 apart
    np.testing.assert_allclose(truncated[1], truncated[2], atol=1e-5)
    assert np.abs(pooled[1] - pooled[2]).max() > 1e-3  # chunk reads the rest (100x the tolerance above)


# --- end to end: train with chunk, export, serve --------------------------------------------------------------------

def long_topic_frame(rows_per_class: int = 24) -> pd.DataFrame:
    """Three topics whose words come first, then 30-50 seeded filler words: every text needs several 32-token windows."""
    vocab = {"sport": ["match", "goal", "team", "league", "coach", "score"],
             "money": ["market", "shares", "profit", "bank", "investor", "stock"],
             "music": ["album", "band", "song", "concert", "guitar", "singer"]}
    rows = []
    for label, words in vocab.items():
        for index in range(rows_per_class):
            draw = random.Random(f"{label}-{index}")
            filler = " ".join(draw.choice(WORDS) for _ in range(draw.randint(30, 50)))
            rows.append({"text": f"{' '.join(draw.sample(words, 4))} {filler}", "label": label})
    return pd.DataFrame(rows)


CHUNK = {"long_text": "chunk", "chunk_overlap": 8, "max_chunks": 4}


@pytest.fixture(scope="module")
def chunked(tiny_model, tmp_path_factory):
    """ingest → validate → train (LoRA, long_text chunk) → export once, registered in a temporary registry twice: as
    exported, and with serving.json's long_text removed (an export made before the policy existed)."""
    from pipeline.runner import run_stage
    from pipeline.table import STAGES
    from tuneflow.artifacts import read_json
    from tuneflow.registry import CHAMPION, Registry

    folder = tmp_path_factory.mktemp("long-text")
    source = folder / "long.csv"
    long_topic_frame().to_csv(source, index=False)
    params = Params.model_validate({
        "artifacts": str(folder / "artifacts"), "data": {"source": str(source)},
        "model": {"base": str(tiny_model), "max_length": 32, **CHUNK},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 5e-3},
        "export": {"optimize": "none"},
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        for name in ("ingest", "validate", "train", "export"):
            run_stage(STAGES[name], params)
        root = Path(params.artifacts)
        export_dir = root / a.EXPORT
        legacy = folder / "legacy-export"
        shutil.copytree(export_dir, legacy)
        serving = read_json(legacy / a.ASSETS / a.SERVING)
        del serving["long_text"]
        (legacy / a.ASSETS / a.SERVING).write_text(json.dumps(serving), encoding="utf-8")
        registry = Registry()
        parity = read_json(export_dir / a.PARITY)
        for name, bundle in (("chunked", export_dir), ("legacy", legacy)):
            assets = sorted(path for path in (bundle / a.ASSETS).iterdir() if path.is_file())
            version = registry.log_candidate(model_name=name, onnx_path=bundle / parity["onnx_file"], extra_files=assets,
                                             params={}, metrics={}, step_metrics=[], artifacts=[], resolved_params={},
                                             tags={"onnx_sha256": parity["onnx_sha256"]})
            with registry.lock(name):
                registry.move_alias(name, CHAMPION, version.version, reason="test", run_id=version.run_id)
        yield SimpleNamespace(params=params, root=root, export_dir=export_dir, legacy=legacy, registry=registry,
                              validation=pd.read_parquet(root / a.VALIDATION / a.GATED_DATA / a.split_file("validation")))


@pytest.mark.slow  # the shared fixture trains and exports: ~2 min on the loaded 2-core machine
def test_train_records_the_policy_and_export_carries_it_into_parity_and_serving(chunked):
    from tuneflow.artifacts import read_json

    summary = read_json(chunked.root / a.MODEL / a.TRAIN_SUMMARY)
    expected = {"policy": "chunk", "head_fraction": 0.25, "chunk_overlap": 8, "max_chunks": 4}
    assert summary["long_text"] == expected
    assert summary["validation_windows"] > 2 * summary["validation_rows"] == 2 * len(chunked.validation)
    parity = read_json(chunked.export_dir / a.PARITY)
    assert parity["passed"] and parity["long_text"] == expected
    assert read_json(chunked.export_dir / a.ASSETS / a.SERVING)["long_text"] == expected


@pytest.mark.slow  # the shared fixture trains and exports: ~2 min on the loaded 2-core machine
def test_onnx_and_pytorch_pool_the_same_windows_for_a_chunked_export(chunked):
    from tuneflow.onnx_runtime import OnnxClassifier
    from tuneflow.trained import load_trained, predict_logits, read_logits, summary_long_text

    texts = chunked.validation["text"].tolist()
    onnx = OnnxClassifier.from_export(chunked.export_dir)
    assert onnx.long_text == LongText("chunk", 32, 0.25, 8, 4)
    model, summary = load_trained(chunked.root / a.MODEL, chunked.params.model)
    merged = predict_logits(model, onnx.tokenizer, texts, summary_long_text(summary), batch_size=5)
    onnx_logits = onnx.logits(texts, batch_size=7)
    np.testing.assert_allclose(onnx_logits, merged, atol=1e-4)
    np.testing.assert_allclose(onnx_logits, read_logits(chunked.root / a.MODEL / a.VALIDATION_LOGITS), atol=1e-3)
    inputs, owner = onnx.windows(texts)
    raw = onnx.run(inputs)
    assert len(raw) > len(texts)  # the graph scores windows; the classifier pools them
    np.testing.assert_allclose(onnx_logits, pool(raw, owner, len(texts)), atol=1e-5)
    assert OnnxClassifier.from_export(chunked.legacy).long_text == LongText("truncate", 32)  # nothing recorded: truncate


@pytest.mark.slow  # the shared fixture trains and exports: ~2 min on the loaded 2-core machine
def test_served_predictions_depend_on_text_beyond_max_length_only_under_chunk(chunked):
    from fastapi.testclient import TestClient

    from tuneflow.serving import create_app

    head = "goal match team league " + " ".join(WORDS[:40])  # over 32 tokens before the texts differ
    texts = [head + " " + " ".join(WORDS[100:160]), head + " " + " ".join(WORDS[250:310])]

    def served(name: str) -> tuple[list[list[float]], dict]:
        with TestClient(create_app(name, chunked.registry, poll_seconds=0)) as client:
            response = client.post("/predict", json={"texts": texts})
            assert response.status_code == 200, response.text
            probabilities = [list(row["probabilities"].values()) for row in response.json()["predictions"]]
            return probabilities, client.get("/metadata").json()

    chunk_probabilities, chunk_metadata = served("chunked")
    legacy_probabilities, legacy_metadata = served("legacy")
    assert chunk_metadata["long_text"]["policy"] == "chunk" and legacy_metadata["long_text"]["policy"] == "truncate"
    assert np.abs(np.subtract(*chunk_probabilities)).max() > 1e-6  # the tails differ: so do the predictions
    np.testing.assert_array_equal(*legacy_probabilities)  # truncate never reads past the first 32 tokens
