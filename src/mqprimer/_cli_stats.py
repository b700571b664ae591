"""``mqprimer stats [URL] DEST...``: queue depth, once or refreshed in place like ``top``."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from typing import Any, TextIO

from ._cli_common import EXIT_OK, UsageError, is_url, positive_int, show_url, url_arg

_DEFAULT_EVERY = 2.0
_COLUMNS = ("ready", "delayed", "reserved", "dead", "consumers")
_RATES = ("in_per_s", "out_per_s", "net_per_s")
_HELD = ("ready", "delayed", "reserved")  # the messages a queue holds, for the net rate


def add_stats(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "stats", parents=[common], help="queue depth: ready, delayed, reserved, dead letters, consumers",
        description="What the broker can tell about each queue; '-' where it cannot tell (see docs/cli.md). "
        "--watch refreshes in place on a terminal, with messages in and out per second since the last refresh.",
    )
    p.add_argument("pos", nargs="*", metavar="[URL] DEST...")
    p.add_argument("-w", "--watch", nargs="?", const="", metavar="SECONDS",
                   help=f"refresh every SECONDS (default {_DEFAULT_EVERY:g}) until Ctrl-C, with rates")
    p.add_argument("-n", "--count", type=positive_int, help="with --watch: stop after this many refreshes")
    p.set_defaults(func=cmd_stats)


def _split(args: argparse.Namespace) -> tuple[Any, list[str], float | None]:
    from .client import default_url

    pos = list(args.pos)
    every: float | None = None
    if args.watch is not None:
        every = _DEFAULT_EVERY
        if args.watch:
            try:
                every = float(args.watch)
            except ValueError:  # `--watch jobs`: the optional SECONDS was a queue (or the URL)
                pos.insert(1 if pos and is_url(pos[0]) and not is_url(args.watch) else 0, args.watch)
            else:
                if not 0 < every < 1e6:  # also NaN
                    raise UsageError(f"--watch SECONDS must be a number > 0, got {args.watch}")
    elif args.count is not None:
        raise UsageError("--count counts --watch refreshes; add --watch")
    url: Any = url_arg(pos.pop(0)) if pos and is_url(pos[0]) else url_arg(default_url())
    if not pos:
        raise UsageError("expected [URL] DEST...: name at least one queue")
    return url, pos, every


def cmd_stats(args: argparse.Namespace) -> int:
    import mqprimer

    url, dests, every = _split(args)
    with mqprimer.connect(url) as conn:
        if every is None:
            rows = [conn.stats(d).as_dict() for d in dests]
            if args.json:
                print(json.dumps(rows))
            else:
                print(render(rows, rates=False))
            return EXIT_OK
        return _watch(args, conn, url, dests, every)


def _watch(args: argparse.Namespace, conn: Any, url: Any, dests: list[str], every: float) -> int:
    from .errors import ConnectionFailed

    out = sys.stdout
    live = out.isatty() and not args.json  # redraw in place; otherwise one table (or JSON line) per refresh
    prev: dict[str, tuple[float, Any]] = {}
    shown = 0
    try:
        while True:
            started = time.monotonic()
            rows: list[dict[str, Any]] = []
            error = ""
            try:
                for d in dests:
                    st = conn.stats(d)
                    now = time.monotonic()
                    row = st.as_dict()
                    last = prev.get(d)
                    row.update(rates(last[1], st, now - last[0]) if last else dict.fromkeys(_RATES))
                    prev[d] = (now, st)
                    rows.append(row)
            except ConnectionFailed as exc:  # keep watching: the broker may come back
                error = str(exc)
                prev.clear()
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            if args.json:
                print(json.dumps({"time": stamp, "queues": rows, **({"error": error} if error else {})}), flush=True)
            else:
                _draw(out, live, shown == 0, f"mqprimer stats  {show_url(url)}  every {every:g}s  {stamp}",
                      render(rows, rates=True) if rows else "", error)
            shown += 1
            if args.count is not None and shown >= args.count:
                return EXIT_OK
            time.sleep(max(0.0, every - (time.monotonic() - started)))
    except KeyboardInterrupt:  # the way out of a watch, as in top: not an error
        if live:
            out.write("\n")
        return EXIT_OK


def _draw(out: TextIO, live: bool, first: bool, head: str, table: str, error: str) -> None:
    text = "\n".join(x for x in (head, table, f"error: {error}" if error else "") if x)
    if live:  # clear once; then cursor home, the new screen over the old, clear what it left below
        out.write("\x1b[H\x1b[2J" if first else "\x1b[H")
        out.write(text.replace("\n", "\x1b[K\n") + "\x1b[K\n\x1b[J")
    else:
        out.write(text + "\n\n")
    out.flush()


def rates(before: Any, after: Any, seconds: float) -> dict[str, float | None]:
    """Messages in and out per second between two :class:`QueueStats` of one queue.

    From the broker's running totals where it keeps them; one of the two can be derived from
    the other and the change of what the queue holds. A total that went down (the broker
    restarted, the tube was recreated) gives no rate for that interval.
    """
    if seconds <= 0:
        return dict.fromkeys(_RATES)

    def delta(key: str) -> int | None:
        a, b = getattr(before, key), getattr(after, key)
        return None if a is None or b is None or b < a else b - a

    def held(s: Any) -> int | None:
        known = [getattr(s, k) for k in _HELD if getattr(s, k) is not None]
        return sum(known) if known else None

    h0, h1 = held(before), held(after)
    net = None if h0 is None or h1 is None else h1 - h0
    n_in, n_out = delta("enqueued"), delta("dequeued")
    if n_in is None and n_out is not None and net is not None:
        n_in = n_out + net
    if n_out is None and n_in is not None and net is not None:
        n_out = n_in - net
    return {k: None if v is None else v / seconds for k, v in zip(_RATES, (n_in, n_out, net), strict=True)}


def render(rows: list[dict[str, Any]], *, rates: bool) -> str:
    """The table: one line per queue, '-' for what the broker cannot tell."""
    head = ["queue", *_COLUMNS, *(("in/s", "out/s", "net/s") if rates else ())]
    keys = [*_COLUMNS, *(_RATES if rates else ())]
    cells = [[str(r["destination"]), *(_cell(r.get(k)) for k in keys)] for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
             for line in [head, *cells]]
    if any(r.get(k) is None for r in rows for k in _COLUMNS):
        lines.append("-: the broker cannot tell")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "0" if not math.isfinite(v) or abs(v) < 0.05 else f"{v:,.1f}"
    return f"{v:,}"
