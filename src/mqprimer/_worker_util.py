"""Small pieces of the worker runtime: the Outcome record, RSS, log formatting, checks."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("mqprimer.worker")


@dataclass(frozen=True)
class Outcome:
    """What became of one message, for logs, metrics and the ``after`` hook."""

    message_id: str
    destination: str
    attempt: int
    outcome: str  # "ack", "retry", "dead-letter" or "lost" (the connection went away first)
    duration: float  # seconds spent in the handler
    error: BaseException | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.message_id, "destination": self.destination, "attempt": self.attempt,
            "outcome": self.outcome, "duration_ms": round(self.duration * 1000, 3),
        }
        if self.error is not None:
            out["error"] = describe(self.error)
        return out


def rss_mib() -> float | None:
    """This process's resident set size in MiB (current on Linux, peak elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1048576
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1048576 if sys.platform == "darwin" else peak / 1024
    except (ImportError, OSError):
        return None


def emergency(text: str) -> None:
    # from a signal handler: logging takes locks that the interrupted code may hold
    try:
        os.write(2, f"mqprimer worker: {text}\n".encode())
    except OSError:
        pass


def hook(fn: Callable[..., object], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("hook %s failed (ignored)", getattr(fn, "__name__", fn))


def describe(error: BaseException) -> str:
    text = str(error)
    name = type(error).__name__
    return f"{name}: {text[:500]}" if text else name


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
