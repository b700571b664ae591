"""gearman:// against raw pygearman on the same gearmand, in one run.

Run: scripts/brokers up gearmand && .venv/bin/python benchmarks/bench_gearman.py [--n 5000] [--rounds 3] [--json]
(URL from .run/brokers/urls, or --url gearman://...; the harness's gearmand keeps its queue
in sqlite, which bounds both sides: start one with the builtin queue to see the clients)

Cases, each the best of ``--rounds``, both sides alternating in chunks of 500 operations
(the machine is shared and noisy):

- send: mqprimer ``send()`` (envelope built and encoded, returns on ``JOB_CREATED``) vs raw
  pygearman ``submit_job(background=True)`` of the same envelope bytes (one round trip each).
- send_many: batches of 100 built messages, pipelined, beside raw pygearman
  ``submit_multiple_jobs`` of 100 background jobs.
- receive + ack from a pre-filled function: mqprimer ``receive()`` + ``ack()`` (envelope
  decoded, prefetch 100) vs a raw pygearman ``GearmanWorker`` whose task returns at once.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import gearman  # noqa: E402  (pygearman)
from _common import Best, Result, broker_url, report  # noqa: E402

import mqprimer  # noqa: E402

BODY = {"user": "alice", "action": "signup", "plan": "pro", "n": 12345, "tags": ["a", "b"]}
CHUNK = 500


def default_url() -> str:
    return broker_url("gearman", "gearmand")


def server(url: str) -> str:
    u = mqprimer.URL.parse(url)
    return f"{u.host or '127.0.0.1'}:{u.port or 4730}"


class CountingWorker(gearman.GearmanWorker):  # type: ignore[misc]
    """A pygearman worker that leaves its work loop after ``limit`` jobs.

    Jobs are counted in the task, not in ``after_job``: pygearman calls that twice per job.
    """

    def __init__(self, host_list: list[str], task: bytes) -> None:
        super().__init__(host_list)
        self.done = 0
        self.limit = 0
        self.register_task(task, self.run)

    def run(self, worker: Any, job: Any) -> bytes:
        self.done += 1
        return b""

    def after_job(self) -> bool:
        return self.done < self.limit


def run(url: str, n: int, rounds: int) -> list[Result]:
    best = Best()
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        payload = p.build("x", BODY).payload
        client = gearman.GearmanClient([server(url)])
        for _ in range(rounds):
            fn = f"bench.{uuid.uuid4().hex[:8]}"
            task = fn.encode()
            ops: dict[str, Any] = {
                "mqprimer send()": lambda f=fn: p.send(f, BODY),
                "pygearman submit_job(background)": lambda t=task: client.submit_job(t, payload, background=True),
            }
            best.interleaved(ops, n, CHUNK)

            spent = {"mqprimer send_many x100": 0.0, "pygearman submit_multiple_jobs x100": 0.0}
            batch = [{"task": task, "data": payload} for _ in range(100)]
            for _ in range(0, n, 100):
                t = time.perf_counter()
                p.send_many([p.build(fn, BODY) for _ in range(100)])
                spent["mqprimer send_many x100"] += time.perf_counter() - t
                t = time.perf_counter()
                client.submit_multiple_jobs(batch, background=True, wait_until_complete=False)
                spent["pygearman submit_multiple_jobs x100"] += time.perf_counter() - t
            for name, secs in spent.items():
                best.keep(name, n - n % 100, secs)

            # the function now holds 4n jobs: each side takes n of them, the rest are drained
            worker = CountingWorker([server(url)], task)
            drained = {"mqprimer receive()+ack()": 0.0, "pygearman worker": 0.0}
            with conn.consumer(fn, prefetch=100) as c:
                for _ in range(0, n, CHUNK):
                    t = time.perf_counter()
                    for _ in range(CHUNK):
                        m = c.receive(timeout=10)
                        assert m is not None, "mqprimer consumer starved"
                        m.ack()
                    drained["mqprimer receive()+ack()"] += time.perf_counter() - t
                    worker.done, worker.limit = 0, CHUNK
                    t = time.perf_counter()
                    worker.work(poll_timeout=1.0)
                    drained["pygearman worker"] += time.perf_counter() - t
                while (m := c.receive(timeout=0.5)) is not None:  # the queue is persistent: leave nothing
                    m.ack()
            for name, secs in drained.items():
                best.keep(name, n - n % CHUNK, secs)
            worker.shutdown()
    return list(best.rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--url", default=None)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run(args.url or default_url(), args.n, args.rounds)
    report(
        "gearman:// vs pygearman (best of rounds)",
        rows,
        [
            ("mqprimer send()", "pygearman submit_job(background)"),
            ("mqprimer send_many x100", "pygearman submit_multiple_jobs x100"),
            ("mqprimer receive()+ack()", "pygearman worker"),
        ],
    )


if __name__ == "__main__":
    main()
