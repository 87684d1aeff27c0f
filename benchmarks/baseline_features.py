"""The evaluation gate's TF-IDF baseline: word n-grams alone vs character n-grams alone vs both (what ships).

Each dataset goes through `tuneflow ingest` and `tuneflow validate` in a scratch folder (the gated splits the gate
scores on); MR 7:1 keeps every negative review and a seeded seventh as many positives. Each variant is fit on train
and scored on validation and test (macro-F1). Prints a table and appends it to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/baseline_features.py
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MR, publish  # noqa: E402

TUNEFLOW = Path(sys.executable).parent / "tuneflow"


def variants() -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    from tuneflow.baseline import fit_baseline

    words = lambda: TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    characters = lambda: TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=(1, 3), min_df=2)
    return {"word 1–2": words, "char_wb 1–3": characters, "union (ships)": lambda: make_union(words(), characters()),
            "tuneflow.baseline": fit_baseline}


def gated_splits(scratch: Path, name: str, source: str) -> dict[str, pd.DataFrame]:
    folder = scratch / name
    folder.mkdir()
    for stage in ("ingest", "validate"):
        subprocess.run([str(TUNEFLOW), stage, "--set", f"data.source={source}", "--set", "validation.fix=true"], cwd=folder,
                       check=True, capture_output=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    gated = folder / "artifacts" / "validation" / "data"
    return {split: pd.read_parquet(gated / f"{split}.parquet") for split in ("train", "validation", "test")}


def main() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline

    scratch = Path(tempfile.mkdtemp(prefix="tuneflow-baseline-"))
    mr = pd.read_csv(MR)
    negatives = mr[mr["label"] == mr["label"].iloc[0]]
    positives = mr[mr["label"] != mr["label"].iloc[0]].sample(len(negatives) // 7, random_state=0)
    pd.concat([negatives, positives]).to_csv(scratch / "mr_7to1.csv", index=False)
    datasets = {"BBC (builtin:bbc)": "builtin:bbc", "MR": str(MR), "MR 7:1": str(scratch / "mr_7to1.csv")}
    rows = []
    for name, source in datasets.items():
        splits = gated_splits(scratch, name.split()[0].lower() + str(len(rows)), source)
        for variant, make in variants().items():
            started = time.monotonic()
            if variant == "tuneflow.baseline":
                model = make(splits["train"]["text"].tolist(), splits["train"]["label"].tolist())
            else:
                model = make_pipeline(make(), LogisticRegression(max_iter=2000, C=10.0)).fit(splits["train"]["text"], splits["train"]["label"])
            scores = [f1_score(splits[split]["label"], model.predict(splits[split]["text"]), average="macro") for split in ("validation", "test")]
            rows.append(f"| {name} | {variant} | {scores[0]:.4f} | {scores[1]:.4f} | {time.monotonic() - started:.1f} |")
            print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    publish(f"\n## TF-IDF baseline features ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"benchmarks/baseline_features.py, load {load:.1f})\n\n"
            "Logistic regression (C=10) on TF-IDF features, fit on the gated train split; macro-F1. "
            "`tuneflow.baseline` is the gate's own function (it must equal the union row).\n\n"
            "| data | features | validation macro-F1 | test macro-F1 | fit + score s |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
