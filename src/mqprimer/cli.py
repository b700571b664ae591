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
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import _cli_commands, _cli_rpc, _cli_stats, _cli_worker, _cli_zmq
from ._cli_common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOPERM,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    UsageError,
)
from .errors import AuthenticationError, ConfigurationError, ConnectionFailed, MQError

# Each command module exposes add_<command>(subparsers, common) functions; a new command
# module adds its functions here (and imports only _cli_common, never this module).
COMMANDS = (
    _cli_commands.add_send, _cli_commands.add_consume, _cli_worker.add_worker, _cli_commands.add_status,
    _cli_commands.add_dead_letters, _cli_worker.add_bridge, _cli_commands.add_doctor, _cli_commands.add_backends,
    _cli_commands.add_bench, _cli_zmq.add_zmq_device, _cli_rpc.add_request, _cli_stats.add_stats,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one clear line instead of argparse's usage block
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


# -- the parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
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
    for register in COMMANDS:
        register(sub, common)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options anywhere among a command's arguments (``send jobs --priority 3 x``), as git,
    pip and docker take them: argparse reads a ``nargs="*"`` positional once, so the options
    after its first word would be refused; a command's own parser reads them intermixed."""
    words = list(sys.argv[1:] if argv is None else argv)
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if words and words[0] in commands:
        command: argparse.ArgumentParser = commands[words[0]]
        args = command.parse_intermixed_args(words[1:])
        args.command = words[0]
        return args
    return parser.parse_args(words)  # --help, --version, or the error for a missing or unknown command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parse_args(parser, argv)
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

    if args.quiet:
        level = logging.WARNING
    elif args.verbose >= 1:
        level = logging.DEBUG
    else:
        level = logging.INFO if args.command in ("worker", "bridge") else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if args.json:
        handler.setFormatter(_cli_worker.JsonFormatter())
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
    sys.exit(main())
