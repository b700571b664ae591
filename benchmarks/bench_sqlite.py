"""sqlite:// throughput against raw sqlite3 on the same disk, in one run.

Run: .venv/bin/python benchmarks/bench_sqlite.py [--n 10000] [--full-n 1000] [--rounds 3] [--dir DIR] [--json]

Durability: WAL journal. ``synchronous=normal`` (mqprimer's default) commits without an
fsync (survives a crash of the process, may lose the last commits on an OS crash or power
loss); ``synchronous=full`` fsyncs the WAL on every commit. Both sides of each comparison
use the same mode, one transaction (commit) per message unless the row says "batch".

The raw baseline is the smallest honest queue in sqlite3: a table (seq, queue, payload)
with an index on (queue, seq); send = one INSERT; receive + ack = reserve 100 rows with
one UPDATE ... RETURNING, then one DELETE per message. The ratio is therefore everything
mqprimer adds: the envelope, the portable layer, and the columns and indexes that give
priority, delay, TTL, redelivery and status by id.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Result, latencies, report, timed  # noqa: E402

import mqprimer  # noqa: E402

BODY = {"user": "alice", "action": "signup", "plan": "pro", "n": 12345, "tags": ["a", "b"]}


def ours(path: Path, sync: str, n: int) -> list[Result]:
    url = f"sqlite:///{path}?synchronous={sync}"
    rows = []
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        def send() -> None:
            p.send("bench", BODY)

        rows.append(latencies(f"mqprimer send ({sync})", n, send))
        batch = [p.build("bench", BODY) for _ in range(n)]

        def send_batches() -> None:
            for i in range(0, n, 100):
                p.send_many(batch[i : i + 100])

        rows.append(timed(f"mqprimer send_many x100 ({sync}, batch)", n, send_batches))
        with conn.consumer("bench", prefetch=100) as c:
            def take() -> None:
                m = c.receive(timeout=5)
                assert m is not None
                m.ack()

            rows.append(latencies(f"mqprimer receive+ack ({sync})", 2 * n, take))
            assert c.receive(timeout=0.2) is None
    return rows


def raw(path: Path, sync: str, n: int) -> list[Result]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {sync}")
    db.execute("CREATE TABLE q (seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT, owner TEXT, payload BLOB)")
    db.execute("CREATE INDEX q_next ON q (queue, seq)")
    with mqprimer.connect("memory://bench-sqlite") as conn:  # the same bytes mqprimer writes
        payload = conn.producer().build("bench", BODY).payload
    def insert() -> None:
        db.execute("INSERT INTO q (queue, payload) VALUES ('bench', ?)", (payload,))

    rows = [latencies(f"raw sqlite3 INSERT ({sync})", n, insert)]

    def insert_batches() -> None:
        for _ in range(0, n, 100):
            db.execute("BEGIN")
            db.executemany("INSERT INTO q (queue, payload) VALUES ('bench', ?)", [(payload,)] * 100)
            db.execute("COMMIT")

    rows.append(timed(f"raw sqlite3 INSERT x100 ({sync}, batch)", n, insert_batches))
    buffer: list[int] = []

    def take() -> None:
        if not buffer:
            got = db.execute(
                "UPDATE q SET owner = 'me' WHERE seq IN (SELECT seq FROM q WHERE queue = 'bench' AND owner IS NULL "
                "ORDER BY seq LIMIT 100) RETURNING seq, payload"
            ).fetchall()
            buffer.extend(sorted((r[0] for r in got), reverse=True))
        db.execute("DELETE FROM q WHERE seq = ?", (buffer.pop(),))

    rows.append(latencies(f"raw sqlite3 UPDATE..RETURNING+DELETE ({sync})", 2 * n, take))
    db.close()
    return rows


def median_rows(rounds: list[list[Result]]) -> list[Result]:
    """Per case, the round with the median rate (rounds alternate mqprimer and raw)."""
    out = []
    for i in range(len(rounds[0])):
        runs = sorted((r[i] for r in rounds), key=lambda r: r.rate)
        out.append(runs[len(runs) // 2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000, help="messages per case with synchronous=normal")
    ap.add_argument("--full-n", type=int, default=1_000, help="messages per case with synchronous=full")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median round is shown")
    ap.add_argument("--dir", default=None, help="where the database files go (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="mqprimer-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    for sync, n in (("normal", args.n), ("full", args.full_n)):
        if n <= 0:
            continue
        mine: list[list[Result]] = []
        theirs: list[list[Result]] = []
        for k in range(args.rounds):
            mine.append(ours(base / f"ours-{sync}-{k}.db", sync, n))
            theirs.append(raw(base / f"raw-{sync}-{k}.db", sync, n))
        for f in base.glob(f"*-{sync}-*.db*"):
            f.unlink()
        report(
            f"sqlite:// vs raw sqlite3, WAL + synchronous={sync.upper()} "
            f"(median of {args.rounds} alternating rounds, files in {base})",
            median_rows(mine) + median_rows(theirs),
            [
                (f"mqprimer send ({sync})", f"raw sqlite3 INSERT ({sync})"),
                (f"mqprimer send_many x100 ({sync}, batch)", f"raw sqlite3 INSERT x100 ({sync}, batch)"),
                (f"mqprimer receive+ack ({sync})", f"raw sqlite3 UPDATE..RETURNING+DELETE ({sync})"),
            ],
        )
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
