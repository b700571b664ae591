"""What the CLI's command modules share: exit codes, usage errors, URL arguments, output.

The command modules (``_cli_commands``, ``_cli_worker``, and any new one) import this;
:mod:`mqprimer.cli` imports the command modules. Nothing here imports a command module.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from .errors import MQError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_UNAVAILABLE, EXIT_NOPERM, EXIT_INTERRUPTED = 69, 77, 130


class UsageError(Exception):
    """Bad input from the command line: one line, exit code 2."""


def is_url(text: str) -> bool:
    return "://" in text


def url_arg(text: str) -> "str | list[str]":
    """One URL, or a list when the argument is several comma-separated URLs."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 1 and all(is_url(p) for p in parts):
        return parts
    return text


def split_url(pos: list[str], names: Sequence[str], optional: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """``[URL] NAME... [OPTIONAL...]`` → (url, values); the URL defaults to ``MQPRIMER_URL``."""
    from .client import default_url

    if pos and is_url(pos[0]):
        url: Any = url_arg(pos[0])
        pos = pos[1:]
    else:
        url = url_arg(default_url())
    if not len(names) <= len(pos) <= len(names) + len(optional):
        want = " ".join([*names, *(f"[{o}]" for o in optional)])
        raise UsageError(f"expected [URL] {want}, got {len(pos)} argument(s) after the URL")
    return url, pos


def show_url(url: Any) -> str:
    from .url import URL

    urls = url if isinstance(url, list) else [url]
    out = []
    for u in urls:
        try:
            out.append(str(URL.parse(u)))
        except MQError:
            out.append("<invalid URL>")
    return ", ".join(out)


def emit(args: argparse.Namespace, human: str, data: Any) -> None:
    """Print ``data`` as JSON with ``--json``, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(data, default=str, ensure_ascii=False))
    elif human:
        print(human)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


class Progress:
    """``label: done/total rate`` on stderr, redrawn at most 10 times a second.

    Shown only when stderr is a terminal, or with ``--progress``.
    """

    def __init__(self, label: str, total: int | None = None, *, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            now = time.monotonic()
            if now - self._last >= 0.1:
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-6)
        of = f"/{self.total}" if self.total is not None else ""
        self.stream.write(f"\r{self.label}: {self.done}{of}  {rate:,.0f} msg/s ")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and (self._drawn or self.done):
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def progress_for(args: argparse.Namespace, label: str, total: int | None = None) -> Progress:
    return Progress(label, total, enabled=True if getattr(args, "progress", False) else None)
