"""One shape for a check, in the data gate and in the evaluation gate."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]


@dataclass
class Check:
    """A named test with its measured value, its threshold and a one-sentence reason.

    Only `error` checks gate: a failed warning or note is reported, never blocks."""

    name: str
    passed: bool
    value: Any
    threshold: Any
    reason: str
    severity: Severity = "error"
    evidence: list[Any] = field(default_factory=list)

    @property
    def gating(self) -> bool:
        return self.severity == "error"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"gating": self.gating}


def gate_passed(checks: list[Check]) -> bool:
    return all(check.passed for check in checks if check.gating)


def at_least(name: str, value: float, threshold: float) -> Check:
    passed = value >= threshold
    return Check(name, passed, value, threshold, f"{name} {value:.4f} {'≥' if passed else '<'} minimum {threshold}")


def at_most(name: str, value: float, threshold: float) -> Check:
    passed = value <= threshold
    return Check(name, passed, value, threshold, f"{name} {value:.2f} {'≤' if passed else '>'} maximum {threshold}")
