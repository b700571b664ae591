"""Worker throughput with a no-op handler, and RSS over a long run.

    .venv/bin/python benchmarks/bench_worker.py            # full run
    .venv/bin/python benchmarks/bench_worker.py --quick    # smaller counts

Compares ``mqprimer.Worker`` with the plain ``Consumer.receive`` + ``ack`` loop on the same
backend in the same run (the worker adds a thread hand-off per message and the settling
round trip), on memory:// and on sqlite:// (a file in a temporary folder).

RSS: 200k messages through a no-op worker on memory://, fed by a producer thread that
keeps the queue short, in a fresh interpreter; measured after a warm-up of 200k messages.
The warm-up is that long because the memory broker remembers the last 100k settled ids
for ``status()``: its store (and the dict behind it) is full only after ~170k messages.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Result, report, timed  # noqa: E402

import mqprimer  # noqa: E402
from mqprimer.worker import Worker, rss_mib  # noqa: E402

QUICK = "--quick" in sys.argv


def fill(url: str, queue: str, n: int) -> None:
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        for i in range(0, n, 500):
            p.send_many([p.build(queue, {"i": j}) for j in range(i, min(i + 500, n))])


def consumer_loop(url: str, queue: str, n: int, prefetch: int) -> None:
    with mqprimer.connect(url) as conn, conn.consumer(queue, prefetch=prefetch) as c:
        for _ in range(n):
            m = c.receive(timeout=5)
            assert m is not None
            m.ack()


def worker_run(url: str, queue: str, n: int, prefetch: int, concurrency: int = 1) -> None:
    w = Worker(url, queue, lambda m: None, max_messages=n, prefetch=prefetch, concurrency=concurrency,
               handle_signals=False)
    assert w.run() == 75 and w.stats["ack"] == n


def throughput(label: str, url: str, n: int, repeat: int) -> list[Result]:
    """Each case ``repeat`` times (interleaved, so that a noisy moment hits all), the median kept."""
    cases = (
        (f"{label} consumer receive+ack (baseline)", lambda q: consumer_loop(url, q, n, 100)),
        (f"{label} worker no-op prefetch=10", lambda q: worker_run(url, q, n, 10)),
        (f"{label} worker no-op prefetch=100", lambda q: worker_run(url, q, n, 100)),
        (f"{label} worker no-op concurrency=4", lambda q: worker_run(url, q, n, 100, 4)),
    )
    runs: dict[str, list[Result]] = {name: [] for name, _ in cases}
    for _ in range(repeat):
        for name, fn in cases:
            q = f"bench.{uuid.uuid4().hex[:8]}"
            fill(url, q, n)
            runs[name].append(timed(name, n, lambda q=q, fn=fn: fn(q)))  # type: ignore[misc]
    return [sorted(rs, key=lambda r: r.seconds)[len(rs) // 2] for rs in runs.values()]


def rss_run(total: int, warmup: int) -> tuple[float, float, float]:
    url = f"memory://rss{uuid.uuid4().hex[:6]}"
    queue = "rss"
    w = Worker(url, queue, lambda m: None, max_messages=warmup + total, prefetch=100, handle_signals=False)
    samples: dict[str, float] = {}

    def feed() -> None:
        with mqprimer.connect(url) as conn:
            p = conn.producer()
            sent = 0
            while sent < warmup + total:
                if sent - w.handled > 5000:
                    time.sleep(0.005)
                    continue
                n = min(1000, warmup + total - sent)
                p.send_many([p.build(queue, {"i": sent + j, "pad": "x" * 150}) for j in range(n)])
                sent += n
                if "warm" not in samples and w.handled >= warmup:
                    samples["warm"] = rss_mib() or 0.0

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    start = rss_mib() or 0.0
    w.run()
    t.join()
    return start, samples.get("warm", 0.0), rss_mib() or 0.0


def rss_in_fresh_process(total: int, warmup: int) -> tuple[float, float, float]:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(total), str(warmup)], check=True,
                         capture_output=True, text=True).stdout
    start, warm, end = json.loads(out.strip().splitlines()[-1])
    return float(start), float(warm), float(end)


def main() -> None:
    logging.disable(logging.WARNING)
    if "--rss-child" in sys.argv:
        i = sys.argv.index("--rss-child")
        print(json.dumps(rss_run(int(sys.argv[i + 1]), int(sys.argv[i + 2]))))
        return
    n_mem, n_sql, repeat = (20_000, 5_000, 1) if QUICK else (50_000, 10_000, 3)
    rows = throughput("memory", f"memory://bench{uuid.uuid4().hex[:6]}", n_mem, repeat)
    tmp = tempfile.mkdtemp(prefix="mqprimer-bench-")
    try:
        rows += throughput("sqlite", f"sqlite:///{tmp}/bench.db", n_sql, repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(f"worker throughput (no-op handler; median of {repeat})", rows, [
        ("memory worker no-op prefetch=10", "memory consumer receive+ack (baseline)"),
        ("memory worker no-op prefetch=100", "memory consumer receive+ack (baseline)"),
        ("sqlite worker no-op prefetch=10", "sqlite consumer receive+ack (baseline)"),
        ("sqlite worker no-op prefetch=100", "sqlite consumer receive+ack (baseline)"),
    ])
    total, warmup = (50_000, 200_000) if QUICK else (200_000, 200_000)
    start, warm, end = rss_in_fresh_process(total, warmup)
    print(f"\n## RSS, no-op worker on memory://: {total:,} messages after a {warmup:,}-message warm-up")
    print(f"start {start:.1f} MiB, after warm-up {warm:.1f} MiB, end {end:.1f} MiB: "
          f"growth after warm-up {end - warm:+.1f} MiB (target < 5 MiB)")


if __name__ == "__main__":
    main()
