"""Exceptions that map to the documented exit codes (see README, "Exit codes")."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to `limit` characters ("" if it has none): for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""


class TuneflowError(Exception):
    """A failure tuneflow explains in one line. Exit code 1."""

    exit_code = 1
    transient = False  # True: the same call may succeed later (the Prefect driver retries it, orchestration.retries)


class InputError(TuneflowError):
    """Bad input or configuration: names the file, column or key. Exit code 2."""

    exit_code = 2


class DataGateFailed(TuneflowError):
    """The data gate found an error-severity problem; see artifacts/validation/report.md. Exit code 3."""

    exit_code = 3


class StageFailed(TuneflowError):
    """A stage ran but its own check failed (e.g. ONNX parity). Exit code 1."""

    exit_code = 1
