"""amqp:// against raw pika and kombu on the same RabbitMQ, in one run.

Run: scripts/brokers up rabbitmq && .venv/bin/python benchmarks/bench_amqp.py [--n 20000] [--single 2000]
     [--max-priority 9] [--json]
     .venv/bin/python benchmarks/bench_amqp.py --before /tmp/amqp-before [--rounds 3] [--n 20000]
     (``git worktree add --detach /tmp/amqp-before <commit>``: the consume cases of that checkout's
     mqprimer and of this one, each in a subprocess, rounds alternating, best round of each kept)
(URL from .run/brokers/urls, or --url amqp://...). ``--max-priority 0`` measures queues
without ``x-max-priority`` (mqprimer's ``max_priority=0``) on every side.

Every message is persistent and goes to a durable queue on every side. Cases:

- consume + ack at prefetch 100 from a pre-filled queue: mqprimer's Consumer (envelope
  decoding included) vs raw pika ``basic_consume`` acking in its callback vs kombu.
- consumers on one connection (``--before``): 1 consumer receive+ack, and 50 consumers
  on 50 queues (a thread each, one Connection), total msg/s, beside another checkout.
- publish with confirms: pika's own blocking confirm (one round trip per message) vs
  mqprimer ``send()`` (the same: it returns when RabbitMQ confirmed) vs kombu
  ``confirm_publish``; and mqprimer ``send_many`` batches of 1000 and 5000 (pipelined,
  every message confirmed before it returns).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import kombu  # noqa: E402
import pika  # noqa: E402
from _common import Result, broker_url, latencies, report, timed, timed_threads  # noqa: E402

import mqprimer  # noqa: E402

BODY = {"user": "alice", "action": "signup", "plan": "pro", "n": 12345, "tags": ["a", "b"]}
ARGS: dict[str, Any] = {"x-max-priority": 9}  # what mqprimer declares: every side uses the same queues


def default_url() -> str:
    return broker_url("amqp", "rabbitmq")


def pika_params(url: str) -> pika.URLParameters:
    return pika.URLParameters(url)


def fill(conn: mqprimer.Connection, queue: str, n: int) -> None:
    p = conn.producer()
    for i in range(0, n, 1000):
        p.send_many([p.build(queue, BODY) for _ in range(min(1000, n - i))])


def consume_ours(conn: mqprimer.Connection, queue: str, n: int) -> None:
    with conn.consumer(queue, prefetch=100) as c:
        for _ in range(n):
            m = c.receive(timeout=10)
            assert m is not None, "mqprimer consumer starved"
            m.ack()


def consume_pika(url: str, queue: str, n: int) -> None:
    conn = pika.BlockingConnection(pika_params(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)
    count = 0

    def on_message(ch: Any, method: Any, _p: object, _b: bytes) -> None:
        nonlocal count
        ch.basic_ack(method.delivery_tag)
        count += 1
        if count == n:
            ch.stop_consuming()

    ch.basic_consume(queue, on_message)
    ch.start_consuming()
    conn.close()


def consume_kombu(url: str, queue: str, n: int) -> None:
    count = 0
    with kombu.Connection(url) as kc:
        q = kombu.Queue(queue, durable=True, queue_arguments=ARGS, no_declare=True)

        def on_message(message: kombu.Message) -> None:
            nonlocal count
            message.ack()
            count += 1

        with kc.Consumer(q, on_message=on_message, prefetch_count=100, accept=["application/cloudevents+json"]):
            while count < n:
                kc.drain_events(timeout=10)


def publish_rows(url: str, conn: mqprimer.Connection, single: int, n: int) -> list[Result]:
    rows = []
    queue = f"bench.pub.{uuid.uuid4().hex[:8]}"
    p = conn.producer()
    rows.append(latencies("mqprimer send() confirmed", single, lambda: p.send(queue, BODY) and None))

    pc = pika.BlockingConnection(pika_params(url))
    ch = pc.channel()
    ch.queue_declare(queue, durable=True, arguments=ARGS)
    ch.confirm_delivery()
    payload = p.build(queue, BODY).payload
    props = pika.BasicProperties(delivery_mode=2, content_type="application/cloudevents+json")
    rows.append(latencies("pika blocking confirm", single, lambda: ch.basic_publish("", queue, payload, props)))

    with kombu.Connection(url, transport_options={"confirm_publish": True}) as kc:
        producer = kc.Producer()
        kq = kombu.Queue(queue, durable=True, queue_arguments=ARGS, no_declare=True)

        def kombu_send() -> None:
            producer.publish(payload, routing_key=queue, delivery_mode=2, content_type="application/cloudevents+json",
                             content_encoding="binary", declare=[kq])

        rows.append(latencies("kombu publish confirm_publish", single, kombu_send))

    batch = [p.build(queue, BODY) for _ in range(n)]
    for size in (1000, 5000):
        def send_batches(size: int = size) -> None:
            for i in range(0, n, size):
                p.send_many(batch[i : i + size])

        rows.append(timed(f"mqprimer send_many x{size} confirmed", n, send_batches))
    ch.queue_delete(queue)
    pc.close()
    return rows


def consume_many(conn: mqprimer.Connection, queues: list[str], per_queue: int) -> float:
    """Seconds for one consumer thread per queue (all on ``conn``) to receive+ack ``per_queue`` each."""
    consumers = [conn.consumer(q, prefetch=100) for q in queues]
    go = threading.Barrier(len(queues) + 1)

    def run(c: mqprimer.Consumer) -> None:
        go.wait()
        for _ in range(per_queue):
            m = c.receive(timeout=30)
            assert m is not None, "mqprimer consumer starved"
            m.ack()

    secs = timed_threads([threading.Thread(target=run, args=(c,)) for c in consumers], go)
    for c in consumers:
        c.close()
    return secs


def consume_cases(url: str, n: int, fanout: int) -> dict[str, float]:
    """msg/s of the consume cases with the mqprimer this process imports (``--consume-only``)."""
    out: dict[str, float] = {}
    tag = uuid.uuid4().hex[:8]
    with mqprimer.connect(url) as conn:
        one = f"bench.one.{tag}"
        many = [f"bench.many.{tag}.{i}" for i in range(fanout)]
        fill(conn, one, n)
        for q in many:
            fill(conn, q, n // fanout)
        cpu = time.process_time()
        out["1 consumer receive+ack"] = timed("", n, lambda: consume_ours(conn, one, n)).rate
        out["1 consumer: CPU µs per message (lower is better)"] = (time.process_time() - cpu) / n * 1e6
        each = n // fanout
        cpu = time.process_time()
        out[f"{fanout} consumers on {fanout} queues, total"] = each * fanout / consume_many(conn, many, each)
        out[f"{fanout} consumers: CPU µs per message (lower is better)"] = (time.process_time() - cpu) / n * 1e6
    pc = pika.BlockingConnection(pika_params(url))
    ch = pc.channel()
    for q in [one, *many]:
        ch.queue_delete(q)
    pc.close()
    return out


def before_after(url: str, before: str, n: int, rounds: int, fanout: int) -> None:
    """The consume cases of ``before``'s checkout and of this one, rounds alternating (each in a
    subprocess importing its own ``src``), best round of each; and the process CPU time per
    message (both threads), which the load of other processes on a shared machine disturbs less."""
    here = str(Path(__file__).resolve().parent.parent)
    best: dict[str, dict[str, float]] = {"before": {}, "now": {}}
    for _ in range(rounds):
        for side, root in (("before", before), ("now", here)):
            env = dict(os.environ, PYTHONPATH=str(Path(root) / "src"))
            cmd = [sys.executable, __file__, "--url", url, "--n", str(n), "--fanout", str(fanout), "--consume-only"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:  # e.g. the shared broker restarted by another test: this round does not count
                print(f"{side} round failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            for case, rate in json.loads(done.stdout).items():
                keep = min if "CPU" in case else max
                best[side][case] = keep(rate, best[side].get(case, rate))
    print(f"\n## AMQP consume + ack (prefetch 100), {before} vs this checkout, best of {rounds} alternating rounds")
    print(f"{'case (msg/s unless said)':52} {'before':>10} {'now':>10} {'now/before':>10}")
    for case, rate in best["now"].items():
        old = best["before"].get(case, float("nan"))
        print(f"{case:52} {old:10.0f} {rate:10.0f} {rate / old:9.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--single", type=int, default=2000)
    ap.add_argument("--max-priority", type=int, default=9)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--before", default=None, help="another checkout to compare the consume cases with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fanout", type=int, default=50)
    ap.add_argument("--consume-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    url = a.url or default_url()
    if a.consume_only:
        print(json.dumps(consume_cases(url, a.n, a.fanout)))
        return
    if a.before:
        before_after(url, a.before, a.n, a.rounds, a.fanout)
        return
    ARGS.clear()
    if a.max_priority:
        ARGS["x-max-priority"] = a.max_priority
    ours = url + ("&" if "?" in url else "?") + f"max_priority={a.max_priority}"
    with mqprimer.connect(ours) as conn:
        tag = uuid.uuid4().hex[:8]
        queues = {who: f"bench.consume.{who}.{tag}" for who in ("pika", "mqprimer", "kombu")}
        for q in queues.values():
            fill(conn, q, a.n)
        rows = [
            timed("pika consume+ack (prefetch 100)", a.n, lambda: consume_pika(url, queues["pika"], a.n)),
            timed("mqprimer receive+ack (prefetch 100)", a.n, lambda: consume_ours(conn, queues["mqprimer"], a.n)),
            timed("kombu consume+ack (prefetch 100)", a.n, lambda: consume_kombu(url, queues["kombu"], a.n)),
        ]
        report("AMQP consume + ack, same RabbitMQ", rows, [
            ("mqprimer receive+ack (prefetch 100)", "pika consume+ack (prefetch 100)"),
            ("kombu consume+ack (prefetch 100)", "pika consume+ack (prefetch 100)"),
        ])
        rows = publish_rows(url, conn, a.single, a.n)
        report("AMQP publish, persistent, confirmed", rows, [
            ("mqprimer send() confirmed", "pika blocking confirm"),
            ("kombu publish confirm_publish", "pika blocking confirm"),
            ("mqprimer send_many x1000 confirmed", "pika blocking confirm"),
            ("mqprimer send_many x5000 confirmed", "pika blocking confirm"),
        ])
        pc = pika.BlockingConnection(pika_params(url))
        ch = pc.channel()
        for q in queues.values():
            ch.queue_delete(q)
        pc.close()


if __name__ == "__main__":
    main()
