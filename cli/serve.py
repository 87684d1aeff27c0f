"""`tuneflow serve`: the registry's champion over HTTP (the app is tuneflow/serving.py; uvicorn runs it)."""

from __future__ import annotations

import argparse
import logging
import os

DEFAULT_PORT = 8000
# tuneflow.serving.Limits' defaults, not imported: the app's imports would add 0.35 s to every tuneflow command
# (tests/test_serving.py keeps the two equal)
DEFAULT_LIMITS = {"max_texts": 64, "max_chars": 10_000, "max_body_bytes": 4 * 1024 * 1024}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    max_texts, max_chars, max_body_bytes = DEFAULT_LIMITS.values()
    parser.add_argument("--model", help="registered model name (default: promote.model_name from --params)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}")
    parser.add_argument("--poll-seconds", type=float, default=10.0,
                        help="look up @champion this often and load a new version when it moved (default: 10; 0: only on POST /reload)")
    parser.add_argument("--max-texts", type=int, default=max_texts, help=f"texts per request (default: {max_texts})")
    parser.add_argument("--max-chars", type=int, default=max_chars, help=f"characters per text (default: {max_chars})")
    parser.add_argument("--max-body-bytes", type=int, default=max_body_bytes,
                        help=f"request body size; larger gets 413 (default: {max_body_bytes})")
    parser.add_argument("--concurrency", type=int, help="inference calls at once; others wait their turn (default: one per CPU core)")
    parser.add_argument("--onnx-threads", type=int, default=1,
                        help="ONNX Runtime threads per inference call (default: 1; 0: ONNX Runtime's default, all cores)")
    parser.add_argument("--limit-concurrency", type=int, default=256,
                        help="open connections and requests at once before uvicorn answers 503 (default: 256)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--no-access-log", action="store_true", help="no log line per request")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tuneflow.config import load_params
    from tuneflow.registry import Registry
    from tuneflow.serving import Limits, create_app

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_name = args.model or load_params(args.params).promote.model_name
    app = create_app(model_name, Registry(), Limits(args.max_texts, args.max_chars, args.max_body_bytes),
                     poll_seconds=args.poll_seconds, concurrency=args.concurrency, onnx_threads=args.onnx_threads or None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.no_access_log,
                limit_concurrency=args.limit_concurrency)
    return 0
