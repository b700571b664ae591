"""Core benchmarks: envelope codec, memory:// round trip. Run: .venv/bin/python benchmarks/bench_core.py [N]

Brokers left running (RabbitMQ, ActiveMQ's JVM) cost this single-threaded benchmark
up to a third of its throughput on 2 cores: stop them (scripts/brokers down) first.

The "raw" rows are the floor: orjson alone on the same document, and a bare
queue.SimpleQueue hand-off, measured in the same run.
"""

from __future__ import annotations

import json
import queue
import sys
import timeit
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).parent))
from _common import Result, latencies, report, timed  # noqa: E402

import mqprimer  # noqa: E402
from mqprimer._ids import _now_iso  # noqa: E402
from mqprimer.envelope import decode, encode, make  # noqa: E402

BODY = {"user": "alice", "action": "signup", "plan": "pro", "n": 12345, "tags": ["a", "b"]}


def codec(n: int) -> list[Result]:
    env = make(id="0b4c3f0e-8f5e-4d43-9d1c-1b2a3c4d5e6f", source="urn:mqprimer:host", type="user.signup",
               body=BODY, time=_now_iso())
    wire = encode(env)
    doc = json.loads(wire)
    rows = []
    for name, fn in (
        ("envelope encode+decode (mqprimer)", lambda: decode(encode(env))),
        ("msgspec untyped dumps+loads (same doc)", lambda: msgspec.json.decode(msgspec.json.encode(doc))),
        ("stdlib json dumps+loads (same doc)", lambda: json.loads(json.dumps(doc))),
    ):
        best = min(timeit.repeat(fn, number=n, repeat=5))
        rows.append(Result(name, n, best, best / n * 1e6))
    print(f"envelope size: {len(wire)} bytes")
    return rows


def memory_round_trip(n: int) -> list[Result]:
    with mqprimer.connect("memory://bench") as conn:
        p = conn.producer()
        with conn.consumer("bench", prefetch=100) as c:
            def op() -> None:
                p.send("bench", BODY)
                m = c.receive(timeout=1)
                assert m is not None
                m.ack()
            for _ in range(1000):
                op()

            def loop() -> None:
                for _ in range(n):
                    op()
            plain = timed("memory:// send+receive+ack, 1 thread", n, loop)
            ours = latencies("  same, timing each message", n, op)
    q: queue.SimpleQueue[bytes] = queue.SimpleQueue()

    def raw() -> None:
        q.put(msgspec.json.encode(BODY))
        msgspec.json.decode(q.get())
    return [plain, ours, latencies("SimpleQueue put+get of JSON (raw floor)", n, raw)]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 50_000
    rows = codec(200_000)
    print("\n## envelope codec (p50 column = µs per encode+decode, best of 5)")
    for r in rows:
        print(f"{r.name:44} {r.p50_us:6.2f} µs")
    report("memory:// round trip", memory_round_trip(n))
