"""``mqprimer``: the command line.

Every command takes a broker URL as its first argument, or uses ``MQPRIMER_URL`` (then
the embedded sqlite default) when the first argument is not a URL. Several URLs can be
given as one comma-separated argument (``sqlite:///a.db,sqlite:///b.db``): failover for
sending, all of them at once for consuming.

Exit codes (also in docs/cli.md):

====  ==========================================================================
0     success
1     the operation failed (broker error, unsupported feature, nothing received)
2     usage error or bad input (options, URL, handler that cannot be loaded)
69    broker unreachable (``EX_UNAVAILABLE``)
75    worker recycled (``max_messages``, ``max_memory``, ``max_time``): start it again
77    credentials or access refused (``EX_NOPERM``)
130   interrupted (Ctrl-C); a worker aborted by a second signal exits 128 + signal
====  ==========================================================================

Errors are one line on stderr, never a traceback (``MQPRIMER_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from .errors import AuthenticationError, ConfigurationError, ConnectionFailed, MQError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_UNAVAILABLE, EXIT_NOPERM, EXIT_INTERRUPTED = 69, 77, 130


class UsageError(Exception):
    """Bad input from the command line: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one clear line instead of argparse's usage block
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


# -- helpers shared by the commands ------------------------------------------------------
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


# -- the parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import _cli_commands as c
    from . import _cli_worker as w

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    common.add_argument("--progress", action="store_true", help="show progress on stderr even when not a terminal")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")

    parser = _Parser(
        prog="mqprimer",
        description="One Producer/Consumer API over many message brokers. The URL argument defaults to "
        "$MQPRIMER_URL, then to the embedded sqlite database.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage, 69 broker unreachable, 75 worker recycled, 77 access refused, "
        "130 interrupted.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mqprimer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for register in (c.add_send, c.add_consume, w.add_worker, c.add_status, c.add_dead_letters, w.add_bridge,
                     c.add_doctor, c.add_backends, c.add_bench):
        register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        code: int = args.func(args)
        return code
    except UsageError as exc:
        return _fail(args, exc, EXIT_USAGE)
    except (ConfigurationError, ValueError) as exc:
        return _fail(args, exc, EXIT_USAGE)
    except AuthenticationError as exc:
        return _fail(args, exc, EXIT_NOPERM)
    except ConnectionFailed as exc:
        return _fail(args, exc, EXIT_UNAVAILABLE)
    except MQError as exc:
        return _fail(args, exc, EXIT_FAILED)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`mqprimer consume ... | head`): not an error worth a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:
        return _fail(args, exc, EXIT_FAILED)


def _fail(args: argparse.Namespace, exc: BaseException, code: int) -> int:
    if os.environ.get("MQPRIMER_DEBUG"):
        import traceback

        traceback.print_exc()
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or exc}: {exc.filename}"
    sys.stderr.write(f"mqprimer {args.command}: error: {text}\n")
    return code


def _setup_logging(args: argparse.Namespace) -> None:
    import logging

    from ._cli_worker import JsonFormatter

    if args.quiet:
        level = logging.WARNING
    elif args.verbose >= 1:
        level = logging.DEBUG
    else:
        level = logging.INFO if args.command in ("worker", "bridge") else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if args.json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries log their own view of every failure, with tracebacks, and their DEBUG
    # output can carry bodies or SASL frames: mqprimer reports the failure once, in one
    # line. Their warnings come back with -v, everything with -vv.
    libs = {0: logging.CRITICAL, 1: logging.WARNING}.get(args.verbose, logging.DEBUG)
    for name in ("pika", "stomp", "stomp.py", "slixmpp", "greenstalk", "gearman", "pygearman", "zmq", "asyncio"):
        logging.getLogger(name).setLevel(libs)


if __name__ == "__main__":  # pragma: no cover
    # `python -m mqprimer.cli`: run the importable module, so that its classes are the ones
    # the command modules import (not a second copy living in __main__)
    from mqprimer.cli import main as _main

    sys.exit(_main())
