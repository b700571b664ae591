"""beanstalk:// against raw greenstalk on the same beanstalkd, in one run.

Run: scripts/brokers up beanstalkd && .venv/bin/python benchmarks/bench_beanstalk.py [--n 20000] [--rounds 3] [--json]
(URL from .run/brokers/urls, or --url beanstalk://...)

Cases, each the best of ``--rounds``, both sides alternating in chunks of 500 operations
(the machine is shared and noisy):

- send: mqprimer ``send()`` (envelope built and encoded, returns on ``INSERTED``) vs raw
  greenstalk ``put`` of the same envelope bytes (one round trip each).
- send_many: batches of 100 built messages, pipelined (reported beside raw put).
- receive + ack from a pre-filled tube: mqprimer ``receive()`` + ``ack()`` (envelope
  decoded) vs raw greenstalk ``reserve(0)`` + ``delete`` (two round trips each).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import greenstalk  # noqa: E402
from _common import Best, Result, broker_url, report  # noqa: E402

import mqprimer  # noqa: E402

BODY = {"user": "alice", "action": "signup", "plan": "pro", "n": 12345, "tags": ["a", "b"]}


def default_url() -> str:
    return broker_url("beanstalk", "beanstalkd")


def raw_client(url: str, tube: str) -> "greenstalk.Client[bytes]":
    u = mqprimer.URL.parse(url)
    return greenstalk.Client((u.host or "127.0.0.1", u.port or 11300), encoding=None, use=tube, watch=tube)


def fill(url: str, tube: str, payload: bytes, n: int) -> None:
    c = raw_client(url, tube)
    for _ in range(n):
        c.put(payload)
    c.close()


def run(url: str, n: int, rounds: int) -> list[Result]:
    """Each side runs ``n`` operations per round in chunks of 500, alternating with the other
    side, so a load burst from elsewhere on the machine hits both alike; best round kept."""
    best = Best()
    chunk = 500

    with mqprimer.connect(url) as conn:
        p = conn.producer()
        payload = p.build("x", BODY).payload
        for _ in range(rounds):
            tube = f"bench.{uuid.uuid4().hex[:8]}"
            raw = raw_client(url, tube)
            ops = {
                "mqprimer send()": lambda t=tube: p.send(t, BODY),
                "greenstalk put": lambda r=raw: r.put(payload),
                # control: raw put after as much CPU work as mqprimer spends per send (~6 us);
                # on this VM any work between round trips slows the next one down
                "greenstalk put after 6 us of work (control)": lambda r=raw: _spin(6e-6) or r.put(payload),
            }
            best.interleaved(ops, n, chunk)

            # batches: pipelined puts (one write per batch, then the replies)
            t = time.perf_counter()
            for _ in range(0, n, 100):
                p.send_many([p.build(tube, BODY) for _ in range(100)])
            best.keep("mqprimer send_many x100", n - n % 100, time.perf_counter() - t)

            # the tube now holds 4n jobs: each side takes n of them, the rest are left
            with conn.consumer(tube, prefetch=100) as c:
                spent = {"mqprimer receive()+ack()": 0.0, "greenstalk reserve+delete": 0.0}
                for _ in range(0, n, chunk):
                    t = time.perf_counter()
                    for _ in range(chunk):
                        m = c.receive(timeout=10)
                        assert m is not None, "mqprimer consumer starved"
                        m.ack()
                    spent["mqprimer receive()+ack()"] += time.perf_counter() - t
                    t = time.perf_counter()
                    for _ in range(chunk):
                        raw.delete(raw.reserve(0))
                    spent["greenstalk reserve+delete"] += time.perf_counter() - t
                for name, secs in spent.items():
                    best.keep(name, n - n % chunk, secs)
            raw.close()
    return list(best.rows.values())


def _spin(seconds: float) -> bool:
    """Busy-wait ``seconds``; returns False so ``_spin(t) or op()`` reads as "work, then op"."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run(args.url or default_url(), args.n, args.rounds)
    report(
        "beanstalk:// vs greenstalk (best of rounds)",
        rows,
        [
            ("mqprimer send()", "greenstalk put"),
            ("greenstalk put after 6 us of work (control)", "greenstalk put"),
            ("mqprimer send()", "greenstalk put after 6 us of work (control)"),
            ("mqprimer send_many x100", "greenstalk put"),
            ("mqprimer receive()+ack()", "greenstalk reserve+delete"),
        ],
    )


if __name__ == "__main__":
    main()
