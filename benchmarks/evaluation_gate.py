"""The evaluation gate on MR (movie-review polarity, ~2,100 test texts), as documented acceptance runs.

Three `tuneflow run --pipeline mr-polarity` runs in one scratch project with its own MLflow store:
1. the shipped configuration (train.seed 42): the first model, judged on absolute thresholds;
2. the same configuration with another training seed: judged against run 1's champion by the paired bootstrap
   — it must come out non-inferior, not "better" or "worse" by noise;
3. a deliberately weak candidate (one epoch on 5 % of the data): rejected with readable reasons.
Reports the gate's own wall time (the evaluate stage: robustness, latency, baseline and champion included) and
the side-by-side latency of PyTorch eager vs ONNX Runtime fp32 on the same texts, then appends to RESULTS.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import MR, publish  # noqa: E402

TUNEFLOW = Path(sys.executable).parent / "tuneflow"
RUNS = [
    ("same configuration, train.seed 42", []),
    ("same configuration, train.seed 43", ["train.seed=43"]),
    ("weak: 1 epoch on 5 % of the data", ["data.sample=530", "train.epochs=1"]),
]


def main() -> None:
    rows, latency = [], None
    with tempfile.TemporaryDirectory(prefix="tuneflow-gate-") as scratch:
        project = Path(scratch)
        for name in ("params.yaml", "pipelines.yaml"):
            (project / name).write_text((REPO / name).read_text())
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "PREFECT_HOME": str(project / ".prefect")}
        for label, overrides in RUNS:
            started = time.perf_counter()
            done = subprocess.run([str(TUNEFLOW), "run", "--pipeline", "mr-polarity", "--set", f"data.source={MR}",
                                   *(arg for pair in overrides for arg in ("--set", pair))],
                                  cwd=project, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - started
            gate_s = float(re.search(r"✔ evaluate done in ([\d.]+)s", done.stderr).group(1))
            verdict = json.loads((project / "artifacts" / "eval" / "verdict.json").read_text())
            metrics = json.loads((project / "artifacts" / "eval" / "metrics.json").read_text())
            decision = json.loads((project / "artifacts" / "promotion" / "decision.json").read_text())
            checks = {check["name"]: check for check in verdict["checks"]}
            failed = [f"{name}: {check['reason']}" for name, check in checks.items() if check["gating"] and not check["passed"]]
            rows.append((label, metrics, verdict, decision, checks["champion_non_inferiority"]["reason"], failed, gate_s, wall))
            latency = latency or metrics["latency"]
            print(f"{label}: {verdict['summary']} ({gate_s:.0f}s gate, {wall:.0f}s run)", flush=True)
    publish(render(rows, latency))


def render(rows, latency) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"\n## Evaluation gate on MR: repeat, weak candidate, gate time — {stamp}\n",
             f"`python benchmarks/evaluation_gate.py`; `tuneflow run --pipeline mr-polarity` (LoRA on MiniLM-L6, max_length 64), "
             f"three runs into one registry; {os.cpu_count()} cores.\n",
             "| run | test rows | macro-F1 (95 % CI) | baseline macro-F1 | vs champion | gate (s) | run (s) | promoted |",
             "|---|---|---|---|---|---|---|---|"]
    for label, metrics, verdict, decision, champion_reason, failed, gate_s, wall in rows:
        interval = metrics["intervals"]["macro_f1"]
        lines.append(f"| {label} | {metrics['test_rows']} | {interval['value']:.4f} ({interval['low']:.4f}–{interval['high']:.4f}) | "
                     f"{metrics['baseline']['macro_f1']:.4f} | {champion_reason} | {gate_s:.0f} | {wall:.0f} | "
                     f"{'yes' if decision['promoted'] else 'no'} |")
    lines += ["", "Gating checks that failed, per run:", ""]
    lines += [f"- {row[0]}: " + ("; ".join(row[5]) or "none") for row in rows]
    onnx, pytorch = latency["onnx"], latency["pytorch"]
    lines += ["", "Latency on the same MR test texts (run 1's model; batch 1 includes tokenisation; each runtime in its own fresh process):", "",
              "| runtime | P50 ms | P95 ms | P99 ms | throughput /s (batch 32) | cold start ms | peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for name, profile in (("PyTorch eager", pytorch), ("ONNX Runtime fp32", onnx)):
        lines.append(f"| {name} | {profile['p50']:.2f} | {profile['p95']:.2f} | {profile['p99']:.2f} | {profile['throughput_per_s']:.0f} | "
                     f"{profile['cold_start_ms']['total']:.0f} | {profile['peak_rss_mb']:.0f} |")
    lines.append(f"\nONNX Runtime over PyTorch: P50 ×{pytorch['p50'] / onnx['p50']:.2f} faster, throughput ×"
                 f"{onnx['throughput_per_s'] / pytorch['throughput_per_s']:.2f}.\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
