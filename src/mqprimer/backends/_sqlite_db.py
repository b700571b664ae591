"""The sqlite backend's database: schema, URL options, opening the file, transactions, housekeeping.

Shared by the backend (:mod:`.sqlite`, sending and status) and its subscriptions
(:mod:`._sqlite_sub`); both import it, it imports neither.
"""

from __future__ import annotations

import os
import sqlite3
import time

from ..errors import ConfigurationError
from ..url import URL

SCHEMA_VERSION = "1"
# state: 0 live, 1 live dead letter (in <queue>.dead), 2 acked (kept for status(), no payload)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS mq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mq_messages (
    seq INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    mid TEXT NOT NULL,
    payload BLOB NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    available_at REAL NOT NULL,
    expires_at REAL,
    owner TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    state INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS mq_messages_next ON mq_messages (queue, priority DESC, seq) WHERE state < 2;
CREATE INDEX IF NOT EXISTS mq_messages_done ON mq_messages (seq) WHERE state = 2;
CREATE INDEX IF NOT EXISTS mq_messages_mid ON mq_messages (mid);
CREATE INDEX IF NOT EXISTS mq_messages_expires ON mq_messages (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS mq_subscriptions (
    name TEXT PRIMARY KEY,
    pattern TEXT NOT NULL,
    lease_until REAL
);
"""
LIVE, DEAD, DONE = 0, 1, 2
HOUSEKEEP_EVERY = 10.0  # seconds between housekeeping passes of one connection
# The asyncio twin's loop-side connections (loop_db) never checkpoint the WAL (a checkpoint
# fsyncs the database file): after this many commits on one of them, its owner declines loop
# work until its thread-side connection has committed (the twin's thread path does that next),
# and that commit checkpoints once the WAL holds 1000 pages (sqlite's default autocheckpoint).
LOOP_COMMITS = 128
LOOP_MAX_PAYLOAD = 64 * 1024  # bigger inserts take the thread path (copying them costs ~1 ms/MiB)
LOOP_MAX_BATCH = 256 * 1024  # payload bytes one loop-side reserve takes at most (the thread's: prefetch rows)
_SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}


class Options:
    """The URL's path and query, validated."""

    __slots__ = ("path", "visibility_timeout", "synchronous", "busy_timeout", "status_keep")

    def __init__(self, url: URL) -> None:
        if url.hosts:
            raise ConfigurationError(
                f"{url}: a sqlite URL has no host; use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        path = url.path[1:] if url.path.startswith("/") else url.path
        if not path or path.endswith("/") or path == ":memory:":
            raise ConfigurationError(
                f"{url}: give a database file, e.g. sqlite:///relative/path.db or sqlite:////absolute/path.db "
                "(an in-memory sqlite database cannot be shared; use memory:// for that)"
            )
        self.path = path
        self.visibility_timeout = _number(url, "visibility_timeout", 30.0, 0.05)
        self.busy_timeout = _number(url, "busy_timeout", 5.0, 0.0)
        self.status_keep = int(_number(url, "status_keep", 100_000, 0))
        sync = (url.param("synchronous") or "normal").lower()
        if sync not in _SYNC_MODES:
            raise ConfigurationError(f"{url}: synchronous must be 'normal' or 'full', got {sync!r}")
        self.synchronous = _SYNC_MODES[sync]


def _number(url: URL, key: str, default: float, minimum: float) -> float:
    text = url.param(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ConfigurationError(f"{url}: {key} must be a number >= {minimum:g}, got {text!r}")
    return value


def connect_db(opts: Options) -> sqlite3.Connection:
    """Open the file (creating directories and schema), in WAL mode, autocommit."""
    parent = os.path.dirname(opts.path)
    if parent and not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            why = "a part of it is not a directory" if isinstance(exc, FileExistsError) else exc.strerror or str(exc)
            raise sqlite3.OperationalError(
                f"unable to open database file {opts.path!r}: cannot create its directory ({why})"
            ) from None
    # timeout= is sqlite's busy timeout: waits for other processes' locks, from the first PRAGMA on
    try:
        db = sqlite3.connect(
            opts.path, timeout=opts.busy_timeout, isolation_level=None, check_same_thread=False, cached_statements=64
        )
    except sqlite3.OperationalError as exc:
        raise _open_error(exc, opts.path) from None
    # On a fresh file, switching to WAL and creating the schema can answer SQLITE_BUSY at once,
    # without the busy handler, when other processes open it at the same moment (sqlite skips
    # the handler where waiting could deadlock): try again until busy_timeout has passed.
    deadline = time.monotonic() + opts.busy_timeout
    try:
        while True:
            try:
                _prepare(db, opts)
                return db
            except sqlite3.OperationalError as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() >= deadline:
                    raise _open_error(exc, opts.path) from None
            time.sleep(0.02)
    except BaseException:
        db.close()
        raise


def loop_db(opts: Options) -> sqlite3.Connection | None:
    """A second connection for the asyncio twin's event loop, or ``None`` (``synchronous=full``:
    every commit fsyncs there). It never waits for a lock (busy timeout 0: another connection's
    write lock answers SQLITE_BUSY at once, and the statement has done nothing) and never
    checkpoints the WAL (see LOOP_COMMITS); opened on a thread, as the thread-side one."""
    if opts.synchronous != "NORMAL":
        return None
    db = connect_db(opts)
    try:
        db.execute("PRAGMA busy_timeout = 0")
        db.execute("PRAGMA wal_autocheckpoint = 0")
    except BaseException:
        db.close()
        raise
    return db


def _prepare(db: sqlite3.Connection, opts: Options) -> None:
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch {opts.path} to WAL mode (got {mode})")
    db.execute(f"PRAGMA synchronous = {opts.synchronous}")
    version = _schema_version(db)
    if version is None:
        db.execute("BEGIN IMMEDIATE")
        for stmt in filter(str.strip, _SCHEMA.split(";")):
            db.execute(stmt)
        db.execute("INSERT OR IGNORE INTO mq_meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        db.execute("COMMIT")
        version = _schema_version(db)
    if version != SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"{opts.path} holds mqprimer sqlite schema {version!r}, this version needs {SCHEMA_VERSION!r}"
        )


def _open_error(exc: sqlite3.OperationalError, path: str) -> sqlite3.OperationalError:
    """sqlite's "unable to open database file" names neither the file nor the cause."""
    if "unable to open" not in str(exc):
        return exc
    why = "it is a directory" if os.path.isdir(path) else "check that it and its directory are writable"
    return sqlite3.OperationalError(f"unable to open database file {path!r}: {why}")


def _schema_version(db: sqlite3.Connection) -> str | None:
    try:
        row = db.execute("SELECT value FROM mq_meta WHERE key = 'schema'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    return None if row is None else str(row[0])


def housekeep(db: sqlite3.Connection, opts: Options) -> None:
    """Bounded cleanup any process may do: expired rows, old settled ids, abandoned private subscriptions."""
    now = time.time()
    expired = (
        "SELECT seq FROM mq_messages WHERE expires_at <= ? AND available_at <= ? AND state = 0 LIMIT 10000"
    )
    # status() remembers the acked rows with the highest seq (about: the most recently sent)
    forget = (
        "SELECT seq FROM mq_messages WHERE state = 2 AND seq <= (SELECT seq FROM mq_messages WHERE state = 2 "
        "ORDER BY seq DESC LIMIT 1 OFFSET ?) ORDER BY seq LIMIT 10000"
    )
    with Txn(db):
        db.execute(f"DELETE FROM mq_messages WHERE seq IN ({expired})", (now, now))
        db.execute(f"DELETE FROM mq_messages WHERE seq IN ({forget})", (opts.status_keep,))
        for (name,) in db.execute("SELECT name FROM mq_subscriptions WHERE lease_until < ?", (now,)).fetchall():
            drop_queue(db, name)


def drop_queue(db: sqlite3.Connection, name: str) -> None:
    """Remove a private subscription, its messages and its dead letters (inside a transaction).

    Acked rows stay until trimmed, so status() keeps answering DONE for them.
    """
    db.execute("DELETE FROM mq_subscriptions WHERE name = ?", (name,))
    for queue in (name, f"{name}.dead"):
        db.execute("DELETE FROM mq_messages WHERE queue = ? AND state < 2", (queue,))


class Txn:
    """``BEGIN IMMEDIATE`` (write lock taken up front, so the busy timeout applies) ... ``COMMIT``."""

    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
