"""One line per stage start/end with its duration, and the final summary table."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    say(f"[tuneflow] ▶ {name} …")
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        say(f"[tuneflow] ✖ {name} failed after {time.perf_counter() - started:.1f}s")
        raise
    say(f"[tuneflow] ✔ {name} done in {time.perf_counter() - started:.1f}s")


def table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(key) for key, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{key.ljust(width)}  {value}" for key, value in rows]
    return "\n".join(lines)
