"""AMQP request/reply diagnostics beside bench_rpc.py (issue 13): where a round trip's time goes.

Run: .venv/bin/python benchmarks/bench_rpc_amqp.py counts {raw,direct,noread,handoff} [--n 1000]
     .venv/bin/python benchmarks/bench_rpc_amqp.py caller [--n 600] [--rounds 6]
(broker URL from .run/brokers/urls)

- ``counts MODE``: 50 warm-up then ``--n`` sequential round trips, bench_rpc's service and
  caller in this one process (raw = pika ``BlockingConnection`` on both sides with direct
  reply-to; direct = mqprimer; noread = mqprimer with the waiting threads' reads off, every
  delivery read by the I/O thread and handed over, as before backends/_amqp_read.py; handoff =
  both off, every frame handed to and from the I/O thread, as before backends/_amqp_out.py).
  Prints the voluntary context switches per round trip (``getrusage``: one per thread that
  blocks and is woken). For syscall and instruction counts per round trip run it under ``strace -f -c`` or ``valgrind
  --tool=callgrind`` with ``--n N`` and ``--n 0`` and divide the difference by N.
- ``caller``: the caller side alone, as the issue compares it: a raw pika caller and an
  mqprimer caller (and the hand-off caller) against ONE raw pika service, order rotating
  each round; prints each round's rates, context switches and ratios, and the medians.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import bench_rpc  # noqa: E402
import pika  # noqa: E402
from _common import Result, broker_urls  # noqa: E402

import mqprimer  # noqa: E402
from mqprimer.backends import _amqp_out, _amqp_read  # noqa: E402
from mqprimer.backends._amqp_link import Options, parameters  # noqa: E402
from mqprimer.envelope import decode  # noqa: E402

_DIRECT = _amqp_out.Output.direct
_GET = _amqp_read.Reader.get


def _handoff(on: bool, reads: bool | None = None) -> None:
    """Direct writes off (every request, reply and ack handed to the I/O thread) or back on;
    the waiting threads' reads off (every delivery read and handed over by the I/O thread)
    or on: off with the writes unless ``reads`` says otherwise."""
    _amqp_out.Output.direct = (lambda self, build: False) if on else _DIRECT  # type: ignore[method-assign]
    off = on if reads is None else not reads
    _amqp_read.Reader.get = (lambda self, q, timeout: q.get(True, timeout)) if off else _GET  # type: ignore


def _mark() -> tuple[int, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_nvcsw, time.perf_counter(), r.ru_utime + r.ru_stime


def _loop(n: int, one: Callable[[], None]) -> tuple[float, float, float]:
    """(round trips/s, voluntary context switches and µs of CPU (this process, every thread)
    per round trip) of ``n`` calls after 50 warm-up ones."""
    for _ in range(50):
        one()
    sw, t, cpu = _mark()
    for _ in range(n):
        one()
    sw2, t2, cpu2 = _mark()
    return (n / (t2 - t) if n else 0.0), (sw2 - sw) / max(n, 1), (cpu2 - cpu) * 1e6 / max(n, 1)


def counts(url: str, mode: str, n: int) -> None:
    if mode == "raw":
        out: list[tuple[float, float, float]] = []
        saved = bench_rpc._raw_rounds

        def rounds(name: str, n: int, one: Callable[[], None], many: Callable[[int], None]) -> list[Result]:
            out.append(_loop(n, one))  # sequential only
            return []

        bench_rpc._raw_rounds = rounds
        try:
            bench_rpc.bench_raw_amqp(url, n)
        finally:
            bench_rpc._raw_rounds = saved
        rate, switches, cpu = out[0]
    else:
        _handoff(mode == "handoff", reads=mode == "direct")
        dest = f"bench-rpc-{uuid.uuid4().hex[:8]}"
        stop, ready = threading.Event(), threading.Event()
        th = threading.Thread(target=bench_rpc._serve_mq, args=(url, dest, stop, ready), daemon=True)
        th.start()
        ready.wait(30)
        with mqprimer.connect(url) as conn:
            def one() -> None:
                conn.request(dest, bench_rpc.BODY, timeout=30)

            rate, switches, cpu = _loop(n, one)
        stop.set()
        th.join(10)
        _handoff(False)
    print(f"{mode}: {n} sequential round trips, {rate:.0f}/s, {switches:.2f} voluntary context switches and "
          f"{cpu:.0f} µs of CPU each")


def caller(url: str, n: int, rounds: int) -> None:
    u = mqprimer.URL.parse(url)
    params = parameters(u, Options.from_url(u), "bench rpc caller")
    queue = f"bench-rpc-caller-{uuid.uuid4().hex[:8]}"
    stop, ready = threading.Event(), threading.Event()

    def serve() -> None:  # raw pika, as bench_rpc's raw service; the envelope carries the correlation id too
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.queue_declare(queue, durable=True, arguments={"x-max-priority": 9})
        ch.basic_qos(prefetch_count=32)

        def on(ch: Any, method: Any, props: Any, body: bytes) -> None:
            corr = props.correlation_id or decode(body).id
            ch.basic_publish("", props.reply_to, bench_rpc._payload("", corr),
                             pika.BasicProperties(correlation_id=corr))
            ch.basic_ack(method.delivery_tag)

        ch.basic_consume(queue, on)
        ready.set()
        while not stop.is_set():
            conn.process_data_events(0.1)
        ch.queue_delete(queue)
        conn.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait(30)
    rc = pika.BlockingConnection(params)
    rch = rc.channel()
    got: dict[str, bytes] = {}
    rch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: got.__setitem__(p.correlation_id, b),
                      auto_ack=True)
    seq = iter(range(10**9))

    def raw_one() -> None:
        corr = str(next(seq))
        rch.basic_publish("", queue, bench_rpc._payload("amq.rabbitmq.reply-to", corr),
                          pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=corr))
        while corr not in got:
            rc.process_data_events(1)
        decode(got.pop(corr))

    mconn = mqprimer.connect(url)

    def mq_one() -> None:
        mconn.request(queue, bench_rpc.BODY, timeout=30)

    def handoff_one() -> None:
        _handoff(True)
        try:
            mconn.request(queue, bench_rpc.BODY, timeout=30)
        finally:
            _handoff(False)

    sides: list[tuple[str, Callable[[], None]]] = [("raw", raw_one), ("mqprimer", mq_one), ("handoff", handoff_one)]
    ratios: dict[str, list[float]] = {"mqprimer": [], "handoff": []}
    try:
        for r in range(rounds):
            order = sides[r % 3:] + sides[:r % 3]
            res = {name: _loop(n, fn) for name, fn in order}
            for name in ratios:
                ratios[name].append(res[name][0] / res["raw"][0])
            print(f"round {r + 1} ({', '.join(o[0] for o in order)}): "
                  + ", ".join(f"{k} {v[0]:.0f}/s {v[1]:.2f} sw" for k, v in res.items())
                  + f"; ratios {ratios['mqprimer'][-1]:.2f} / {ratios['handoff'][-1]:.2f}", flush=True)
    finally:
        mconn.close()
        rc.close()
        stop.set()
        th.join(10)
    for name, rs in ratios.items():
        print(f"{name} caller / raw pika caller, same raw service: {' / '.join(f'{x:.2f}' for x in rs)} "
              f"(median {statistics.median(rs):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("counts")
    c.add_argument("mode", choices=["raw", "direct", "noread", "handoff"])
    c.add_argument("--n", type=int, default=1000)
    k = sub.add_parser("caller")
    k.add_argument("--n", type=int, default=600)
    k.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    url = broker_urls().get("amqp")
    if url is None:
        raise SystemExit("no amqp URL: run scripts/brokers up rabbitmq first")
    if args.what == "counts":
        counts(url, args.mode, args.n)
    else:
        caller(url, args.n, args.rounds)


if __name__ == "__main__":
    main()
