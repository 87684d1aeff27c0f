"""`tuneflow reproduce NAME VERSION`: the registered params re-run on the same data give the same metrics and the same
ONNX predictions; changed data is refused in one line; the registry is only read."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from test_stages import run_until, tiny_params
from tuneflow.registry import CHAMPION, Registry

pytestmark = pytest.mark.slow


def test_a_registered_version_reproduces_and_changed_data_is_refused(tiny_model, workdir, capsys):
    params = tiny_params(tiny_model, workdir, epochs=1, deterministic=True, threads=1)
    run_until(params, "promote")
    registry = Registry()
    before = [(version.version, version.tags) for version in registry.versions("tiny")]
    capsys.readouterr()

    assert main(["reproduce", "tiny", "1"]) == 0
    out = capsys.readouterr().out
    assert "0 of " in out and "test predictions differ from the registered ONNX model" in out, out
    report = json.loads((workdir / "reproduce" / "tiny-v1" / "reproduce.json").read_text())
    assert report["metrics_match"] and report["differing_predictions"] == 0 and report["test_texts"] > 0
    assert report["reproduced_test_macro_f1"] == pytest.approx(report["recorded_test_macro_f1"], abs=0.005)

    source = workdir / "topics.csv"
    source.write_text(source.read_text().replace("number 1 for sport", "number 1 for sport rewritten"))
    assert main(["reproduce", "tiny", "1", "--artifacts", str(workdir / "again")]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tuneflow: error: data.source ") and "was trained on" in last and "restore that data" in last, err
    assert "Traceback" not in err and err.count("tuneflow: error:") == 1
    assert [(version.version, version.tags) for version in registry.versions("tiny")] == before
    assert registry.aliases("tiny")[CHAMPION] == "1"
