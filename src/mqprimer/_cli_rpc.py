"""``mqprimer request``: send a request and print its reply (docs/request-reply.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._cli_commands import _json_or_text, message_dict
from ._cli_common import EXIT_OK, UsageError, emit, split_url


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def add_request(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "request", parents=[common], help="send a request and print its reply",
        description="Send BODY (JSON if it parses, else text) to the service on queue DEST and print "
        "the reply's body. Exit 1 when no reply comes within --timeout, or when the service failed the "
        "request (its reason is printed).",
    )
    p.add_argument("pos", nargs="*", metavar="[URL] DEST BODY")
    p.add_argument("--timeout", type=_positive, default=10.0, help="seconds to wait for the reply (default 10)")
    p.add_argument("--text", action="store_true", help="BODY is text, not JSON")
    p.add_argument("-H", "--header", action="append", default=[], metavar="KEY=VALUE", help="a header (repeatable)")
    p.add_argument("--type", help="request type (CloudEvents type)")
    p.set_defaults(func=cmd_request)


def cmd_request(args: argparse.Namespace) -> int:
    import mqprimer

    url, (dest, raw) = split_url(args.pos, ["DEST", "BODY"])
    headers = {}
    for n, h in enumerate(args.header, 1):
        key, sep, value = h.partition("=")
        if not sep or not key:
            raise UsageError(f"--header number {n} must be KEY=VALUE (a non-empty key, then '=')")
        headers[key] = value
    body = raw if args.text else _json_or_text(raw)
    with mqprimer.connect(url) as conn:
        reply = conn.request(dest, body, timeout=args.timeout, headers=headers or None, type=args.type)
    data = message_dict(reply.envelope)
    data["correlation_id"] = reply.correlation_id
    if getattr(args, "json", False):
        emit(args, "", data)
    elif isinstance(reply.body, bytes):
        sys.stdout.buffer.write(reply.body)
        sys.stdout.flush()
    else:
        emit(args, _text(reply.body), data)
    return EXIT_OK


def _text(body: Any) -> str:
    import json

    return body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
