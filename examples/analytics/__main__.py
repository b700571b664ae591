"""Log analytics: ``python -m examples.analytics [--url URL] [--log FILE] [--lines N]``.

Sends every line of an access log (a generated one by default) as a message; two worker
processes count requests per status code and per path in a results database. Lines that
are not access-log lines are dead-lettered. The totals are checked against a direct count.
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

import mqprimer
from examples._run import parser, resolve_url, run_id, say, start_workers, stop_workers, url_list, wait_for
from examples.analytics.handler import LINE, parse

PATHS = ["/", "/login", "/products", "/products/42", "/cart", "/checkout", "/api/orders", "/favicon.ico"]
STATUSES = [200] * 12 + [301, 304, 404, 404, 500, 503]


def generate(path: Path, n: int) -> None:
    rnd = random.Random(7)
    with path.open("w") as f:
        for i in range(n):
            ip = f"10.0.{rnd.randrange(256)}.{rnd.randrange(256)}"
            url = rnd.choice(PATHS) + ("?ref=mail" if rnd.random() < 0.1 else "")
            f.write(f'{ip} - - [27/Nov/2026:10:{i // 60 % 60:02d}:{i % 60:02d} +0000] "GET {url} HTTP/1.1" '
                    f'{rnd.choice(STATUSES)} {rnd.randrange(100, 9000)} "-" "Mozilla/5.0"\n')
        f.write("garbage that is not a log line\n")
        f.write("\n")


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--log", type=Path, help="an access log in combined format (default: a generated one)")
    p.add_argument("--lines", type=int, default=400, help="lines to generate (default 400)")
    args = p.parse_args()
    url = resolve_url(args.url)
    work = Path(tempfile.mkdtemp(prefix="mqprimer-analytics-"))
    log_file = args.log or work / "access.log"
    if args.log is None:
        generate(log_file, args.lines)
    lines = [ln for ln in log_file.read_text().splitlines() if ln.strip()]
    expected = Counter(s for s, _ in (parse(ln) for ln in lines if LINE.match(ln)))
    bad = sum(1 for ln in lines if not LINE.match(ln))
    queue = f"access-log.{run_id()}"
    results = work / "counts.db"
    with mqprimer.connect(url_list(url)) as conn:
        # a backend without queues (XMPP pubsub) gets a topic and one worker on a named
        # subscription, made before sending: it catches up on what was published before the
        # worker subscribed (docs/backend-xmpp.md)
        topic_only = not conn.capabilities.queue
        dest: str | mqprimer.Topic = mqprimer.Topic(queue) if topic_only else queue
        as_topic = ["--topic", "--subscription", "analytics"] if topic_only else []
        if topic_only:
            conn.consumer(dest, subscription="analytics").close()
        producer = conn.producer()
        for i in range(0, len(lines), 100):
            producer.send_many([producer.build(dest, ln, type="log.line") for ln in lines[i:i + 100]])
        say(f"producer: sent {len(lines)} log lines to {queue} ({bad} malformed)")
        workers = start_workers(1 if topic_only else 2, url, queue, "examples.analytics.handler:count_line",
                                "--concurrency", "2", *as_topic, env={"ANALYTICS_DB": str(results)}, quiet=True)

        def counted() -> int:
            if not results.exists():
                return 0
            with sqlite3.connect(results, timeout=30) as con:
                try:
                    return int(con.execute("SELECT COUNT(*) FROM seen").fetchone()[0])
                except sqlite3.OperationalError:
                    return 0

        t0 = time.monotonic()
        try:
            wait_for(lambda: counted() == len(lines) - bad, 120, "every line counted", workers)
            wait_for(lambda: len(conn.dead_letters(queue).list(bad + 1)) == bad, 60, "the malformed lines", workers)
        finally:
            codes = stop_workers(workers)
    with sqlite3.connect(results) as con:
        rows = con.execute("SELECT kind, key, n FROM counts ORDER BY kind DESC, n DESC, key").fetchall()
    say(f"counted {len(lines) - bad} requests in {time.monotonic() - t0:.1f}s; dead letters: {bad}")
    for kind in ("status", "path"):
        say(f"  per {kind}: " + ", ".join(f"{k} {n}" for kd, k, n in rows if kd == kind))
    got = Counter({k: n for kd, k, n in rows if kd == "status"})
    say(f"workers exited with {codes}")
    return 0 if got == expected and codes and set(codes) == {0} else 1


if __name__ == "__main__":
    raise SystemExit(main())
