"""The worker's handler: parse one access-log line, add it to the counts in ``ANALYTICS_DB``.

Counting is made idempotent by recording the message id in the same transaction as the
counts: a message delivered twice (at-least-once) is counted once.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading

import mqprimer

# Apache/nginx "combined" format
LINE = re.compile(r'^(\S+) \S+ \S+ \[[^\]]+\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) (\d+|-)')
_local = threading.local()  # one sqlite connection per handler thread (--concurrency)


def db() -> sqlite3.Connection:
    con: sqlite3.Connection | None = getattr(_local, "db", None)
    if con is None:
        con = _local.db = sqlite3.connect(os.environ["ANALYTICS_DB"], timeout=30, isolation_level=None)
        con.executescript(
            "PRAGMA journal_mode=WAL;"
            "CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY);"
            "CREATE TABLE IF NOT EXISTS counts (kind TEXT, key TEXT, n INTEGER, PRIMARY KEY (kind, key));"
        )
    return con


def parse(line: str) -> tuple[str, str]:
    m = LINE.match(line)
    if m is None:
        raise mqprimer.DeadLetter("not a combined-format access log line")
    return m.group("status"), m.group("path").split("?", 1)[0]


def count_line(message: mqprimer.Message) -> None:
    status, path = parse(message.body)
    con = db()
    con.execute("BEGIN IMMEDIATE")
    try:
        if con.execute("INSERT OR IGNORE INTO seen VALUES (?)", (message.id,)).rowcount:
            for kind, key in (("status", status), ("path", path)):
                con.execute("INSERT INTO counts VALUES (?, ?, 1) ON CONFLICT (kind, key) DO UPDATE SET n = n + 1",
                            (kind, key))
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
