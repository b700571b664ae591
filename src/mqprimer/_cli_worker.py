"""The CLI's long-running commands: ``worker`` and ``bridge``, and their option parsing."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from types import FrameType
from typing import Any

from ._cli_common import (
    EXIT_OK,
    UsageError,
    emit,
    non_negative,
    positive_int,
    progress_for,
    show_url,
    split_url,
    url_arg,
)

log = logging.getLogger("mqprimer.cli")

_MEMORY_UNITS = {"": 1.0, "b": 1 / 1048576, "k": 1 / 1024, "kb": 1e3 / 1048576, "kib": 1 / 1024, "m": 1.0,
                 "mb": 1e6 / 1048576, "mib": 1.0, "g": 1024.0, "gb": 1e9 / 1048576, "gib": 1024.0}
_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_memory(text: str) -> float:
    """``200``, ``200M``, ``200MiB``, ``1.5G``, ``512KiB`` → MiB. A bare number means MiB."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _MEMORY_UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid memory size {text!r}: use a number with an optional unit B, K, KiB, M, MiB, G, GiB (e.g. 200MiB)"
        )
    value = float(m.group(1)) * _MEMORY_UNITS[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"memory size must be > 0, got {text!r}")
    return value


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1.5h``, ``1d`` → seconds. A bare number means seconds."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _TIME_UNITS:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use a number with an optional unit s, m, h, d")
    value = float(m.group(1)) * _TIME_UNITS[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"duration must be > 0, got {text!r}")
    return value


def load_handler(spec: str) -> Callable[..., object]:
    """``package.module:function`` (or ``module:Class.method``) → the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"handler {spec!r} must be MODULE:FUNCTION, e.g. myapp.tasks:make_thumbnail")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: handlers next to where the worker starts
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise UsageError(f"cannot import handler module {module_name!r}: no module named {exc.name!r}") from None
        raise UsageError(f"cannot import handler module {module_name!r}: {exc}") from None
    except Exception as exc:  # the module itself is broken: say how, in one line
        raise UsageError(f"cannot import handler module {module_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"handler module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"handler {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


class JsonFormatter(logging.Formatter):
    """One JSON object per log line; the worker's per-message fields (``record.mq``) merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        mq = getattr(record, "mq", None)
        if isinstance(mq, dict):
            out.update(mq)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


# -- worker ------------------------------------------------------------------------------
def add_worker(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "worker", parents=[common], help="run a handler over every message of a destination",
        description="Run MODULE:FUNCTION(message) for every message of DEST: return = ack, raise mqprimer.Retry = "
        "retry, raise mqprimer.DeadLetter = dead letter, other exceptions = retry by policy then dead letter. "
        "SIGTERM/SIGINT drain and exit 0 (a second one aborts); a recycle limit exits 75.",
    )
    p.add_argument("pos", nargs="*", metavar="[URL] DEST MODULE:FUNCTION")
    p.add_argument("-c", "--concurrency", type=positive_int, default=1, help="handler threads (default 1)")
    p.add_argument("--prefetch", type=positive_int, help="messages in flight (default max(10, 2 x concurrency))")
    p.add_argument("--max-attempts", type=positive_int, default=3, help="deliveries before dead letter (default 3)")
    p.add_argument("--retry-delay", type=non_negative, default=1.0, help="first retry delay, seconds (default 1)")
    p.add_argument("--retry-multiplier", type=float, default=2.0, help="delay growth per attempt (default 2)")
    p.add_argument("--retry-max-delay", type=non_negative, default=60.0, help="longest retry delay (default 60)")
    p.add_argument("--max-messages", type=positive_int, help="recycle (exit 75) after this many messages")
    p.add_argument("--max-memory", type=parse_memory, help="recycle when RSS reaches this (e.g. 200MiB, 1G)")
    p.add_argument("--max-time", type=parse_duration, help="recycle after this long (e.g. 3600, 30m, 1h)")
    p.add_argument("--idle-max", type=parse_duration, default=1.0, help="longest wait per poll when idle (default 1s)")
    p.add_argument("--reconnect-max", type=parse_duration, default=30.0,
                   help="longest wait between reconnect attempts when the broker is down (default 30s)")
    p.add_argument("--touch-leases", action="store_true",
                   help="renew the lease (beanstalkd TTR, sqlite visibility_timeout) of messages in flight, "
                        "so handlers may run longer than it")
    p.add_argument("--topic", action="store_true", help="DEST is a topic or topic pattern")
    p.add_argument("--subscription", help="durable topic subscription name")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from .aio._worker import Worker as AsyncWorker
    from .aio._worker import is_async_handler
    from .backend import Topic
    from .retry import RetryPolicy
    from .worker import Worker

    url, (dest, spec) = split_url(args.pos, ["DEST", "MODULE:FUNCTION"])
    handler = load_handler(spec)
    cls = AsyncWorker if is_async_handler(handler) else Worker  # async def: handlers as tasks on one loop
    policy = RetryPolicy(max_attempts=args.max_attempts, initial_delay=args.retry_delay,
                         multiplier=args.retry_multiplier, max_delay=args.retry_max_delay)
    worker = cls(
        url, Topic(dest) if args.topic else dest, handler, concurrency=args.concurrency, prefetch=args.prefetch,
        retry=policy, max_messages=args.max_messages, max_memory=args.max_memory, max_time=args.max_time,
        idle_max=args.idle_max, reconnect_max=args.reconnect_max, subscription=args.subscription,
        touch_leases=args.touch_leases,
    )
    code = asyncio.run(worker.run()) if isinstance(worker, AsyncWorker) else worker.run()
    s = worker.stats
    log.info("worker exiting with code %d: %d message(s) handled (ack %d, retry %d, dead-letter %d, lost %d)",
             code, worker.handled, s["ack"], s["retry"], s["dead-letter"], s["lost"])
    return code


# -- bridge ------------------------------------------------------------------------------
def add_bridge(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bridge", parents=[common], help="forward messages from one URL to another (ack after the sink confirmed)",
        description="Move messages from SRC_URL SRC_DEST to DST_URL DST_DEST. A message is acked at the source only "
        "after the sink confirmed it (save locally first, push second). Stops on SIGTERM/SIGINT, after --count "
        "messages or after --timeout idle seconds.",
    )
    # one nargs="*" positional, counted in cmd_bridge: argparse's help crashes on a tuple metavar
    p.add_argument("pos", nargs="*", metavar="SRC_URL SRC_DEST DST_URL DST_DEST")
    p.add_argument("-n", "--count", type=positive_int, help="stop after forwarding this many")
    p.add_argument("-t", "--timeout", type=non_negative, help="stop when the source was empty this many seconds")
    p.add_argument("--batch", type=positive_int, default=100, help="messages per confirmed batch (default 100)")
    p.set_defaults(func=cmd_bridge)


def cmd_bridge(args: argparse.Namespace) -> int:
    import mqprimer

    from .backend import Outgoing, Queue
    from .envelope import encode, replace
    from .errors import ConnectionFailed

    if len(args.pos) != 4:
        raise UsageError(f"bridge takes SRC_URL SRC_DEST DST_URL DST_DEST, got {len(args.pos)} argument(s)")
    src_url, src_dest, dst_url, dst_dest = args.pos
    for u, which in ((src_url, "SRC_URL"), (dst_url, "DST_URL")):
        if "://" not in u:  # not echoed: it may be a URL with a password and a typo
            raise UsageError(f"{which} is not a URL (no scheme://); bridge takes SRC_URL SRC_DEST DST_URL DST_DEST")
    # the sink connects lazily, so a malformed or unknown DST_URL must fail here, not after
    # the first message arrives
    from ._endpoint import Endpoint
    from .url import URL

    dst = url_arg(dst_url)
    for raw in dst if isinstance(dst, list) else [dst]:
        for one in URL.parse(raw).split_hosts():
            Endpoint(one)
    stop = _StopFlag()
    forwarded = 0
    progress = progress_for(args, "forwarding", args.count)
    sink: list[mqprimer.Connection] = []  # connected lazily: a sink that is down must not stop the outbox

    def push(items: list[Outgoing]) -> None:
        delay = 0.5
        while True:
            try:
                if not sink:
                    sink.append(mqprimer.connect(url_arg(dst_url)))
                sink[0].publish(items)
                return
            except ConnectionFailed as exc:
                if stop.set:
                    raise
                log.warning("sink unavailable (%s); %d message(s) held unacked at the source, retrying in %.1fs",
                            exc, len(items), delay)
                stop.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 30.0)

    with mqprimer.connect(url_arg(src_url)) as src:
        log.info("bridging %s %s -> %s %s", show_url(src_url), src_dest, show_url(dst_url), dst_dest)
        try:
            with src.consumer(src_dest, prefetch=args.batch) as consumer:
                idle_since = time.monotonic()
                while not stop.set and (args.count is None or forwarded < args.count):
                    want = args.batch if args.count is None else min(args.batch, args.count - forwarded)
                    msg = consumer.receive(timeout=0.25)
                    if msg is None:
                        if args.timeout is not None and time.monotonic() - idle_since >= args.timeout:
                            break
                        continue
                    batch = [msg]
                    while len(batch) < want:
                        more = consumer.receive(timeout=0)
                        if more is None:
                            break
                        batch.append(more)
                    push([Outgoing(Queue(dst_dest), encode(replace(m.envelope, attempt=1), 1 << 62), m.id)
                          for m in batch])
                    for m in batch:
                        m.ack()
                    forwarded += len(batch)
                    progress.update(len(batch))
                    idle_since = time.monotonic()
        finally:
            for c in sink:
                c.close()
    progress.close()
    emit(args, f"forwarded {forwarded} message(s) from {src_dest} to {dst_dest}",
         {"forwarded": forwarded, "source": src_dest, "sink": dst_dest})
    return EXIT_OK


class _StopFlag:
    """Set by the first SIGTERM/SIGINT; the bridge finishes its batch and exits 0."""

    def __init__(self) -> None:
        self.set = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on)

    def _on(self, signum: int, frame: FrameType | None) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.set and time.monotonic() < end:
            time.sleep(min(0.1, end - time.monotonic()))
