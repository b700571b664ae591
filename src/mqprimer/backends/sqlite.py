"""``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db``: a persistent queue in one file.

Several producer and worker processes can share one file (WAL journal, ``busy_timeout``).
Delivery is at-least-once: a consumer reserves rows for ``visibility_timeout`` seconds; a
message neither settled nor given back by then (its process died) is delivered again,
with the lost delivery counted in ``message.attempt``.

URL options: ``visibility_timeout`` (seconds, default 30), ``synchronous`` (``normal``,
the default: survives process crashes, may lose the last commits on an OS crash or power
loss; ``full``: fsync on every commit, survives those too, much slower), ``busy_timeout``
(seconds to wait for another process's write lock, default 5), ``status_keep`` (how many
settled message ids :meth:`status` remembers as DONE, default 100000).

The asyncio twin runs plain sends, polls and acks on its event loop through a second
connection that never waits for a lock and never checkpoints ("not done" then, and the
twin's thread does them): see ``loop_db`` in ._sqlite_db.

The schema, the ordering rules and the housekeeping are described in docs/backend-sqlite.md.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import msgspec

from ..backend import (
    EMULATED,
    NATIVE,
    Backend,
    Capabilities,
    Destination,
    Outgoing,
    Queue,
    QueueStats,
    Status,
    Subscription,
    Topic,
)
from ..topics import matches
from ._sqlite_db import (
    DEAD,
    DONE,
    HOUSEKEEP_EVERY,
    LOOP_COMMITS,
    LOOP_MAX_PAYLOAD,
    Options,
    Txn,
    connect_db,
    drop_queue,
    housekeep,
    loop_db,
)
from ._sqlite_sub import SqliteSubscription

CAPABILITIES = Capabilities(
    name="sqlite",
    topic=NATIVE,
    patterns=NATIVE,
    priority=NATIVE,
    delay=NATIVE,
    ttl=NATIVE,
    retry=NATIVE,
    dead_letter=NATIVE,
    status=NATIVE,
    request_reply=EMULATED,  # a private reply queue per connection; replies expire with their request
    stats=NATIVE,  # exact counts; consumers unknown (a reader leaves no trace until it reserves)
    shared_subscription=NATIVE,  # a subscription is a queue of rows; each row is reserved by one consumer
    confirmed_send=True,
    persistent=True,
    guarantee="at-least-once",
    notes=(
        "one file shared by processes on one host (WAL); a message reserved by a process that dies is "
        "redelivered after visibility_timeout (default 30 s); synchronous=normal (default) survives process "
        "crashes but may lose the last commits on an OS crash or power loss, synchronous=full survives those"
    ),
    # on the asyncio loop through a second connection with busy timeout 0 that never checkpoints
    # (synchronous=normal: a commit does not fsync); a lock held elsewhere: the thread path
    nowait=("poll", "ack"),
)
_NO_LOOP = dataclasses.replace(CAPABILITIES, nowait=())  # synchronous=full: each commit fsyncs

_INSERT = (
    "INSERT INTO mq_messages (queue, mid, payload, priority, available_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)"
)
# a lapsed reservation (owner set, available_at passed) is ready again, as receive sees it
_STATS = (
    "SELECT sum(available_at <= ? AND (expires_at IS NULL OR expires_at > ?)), "
    "sum(available_at > ? AND owner IS NULL), sum(available_at > ? AND owner IS NOT NULL AND "
    "(expires_at IS NULL OR expires_at > ?)) FROM mq_messages WHERE queue = ? AND state = 0"
)
# what fresh_format (envelope.py) writes before a new message's id: fast_publisher reads it there
_ID_AT = b'{"specversion":"1.0","id":"'
# several rows can share an id (a topic message in several subscriptions): report the most active one
_RANK = {Status.RESERVED: 5, Status.READY: 4, Status.DELAYED: 3, Status.DEAD: 2, Status.DONE: 1, Status.UNKNOWN: 0}


class SqliteBackend(Backend):
    capabilities = CAPABILITIES
    # OperationalError: cannot open / locked / disk I/O; OSError: cannot create the directory.
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (sqlite3.OperationalError, OSError)
    url_params = frozenset({"visibility_timeout", "synchronous", "busy_timeout", "status_keep"})
    lease_param = "visibility_timeout"

    db: sqlite3.Connection | None = None
    ndb: sqlite3.Connection | None = None  # the event loop's (nowait_publisher)

    def open(self) -> None:
        self.opts = Options(self.url)
        self.db = connect_db(self.opts)
        self._loop_commits = 0
        try:
            self._next_housekeeping = 0.0
            self._housekeep()
            self.ndb = loop_db(self.opts)
        except BaseException:
            self.close()
            raise
        if self.ndb is None:
            self.capabilities = _NO_LOOP

    def close(self) -> None:
        db, self.db = self.db, None
        ndb, self.ndb = self.ndb, None
        if ndb is not None:
            ndb.close()
        if db is not None:
            db.close()

    def _conn(self) -> sqlite3.Connection:
        if self.db is None:
            raise sqlite3.ProgrammingError("the sqlite backend is closed")
        return self.db

    # -- sending --------------------------------------------------------------------------
    def publish(
        self,
        destination: Destination,
        payload: bytes,
        *,
        message_id: str,
        priority: int | None = None,
        delay: float | None = None,
        ttl: float | None = None,
    ) -> None:
        db = self._conn()
        now = time.time()
        available = now + (delay or 0.0)
        expires = available + ttl if ttl else None
        if isinstance(destination, Topic):
            with Txn(db):
                for name in self._targets(db, destination.name, now):
                    db.execute(_INSERT, (name, message_id, payload, priority or 0, available, expires))
        else:
            db.execute(_INSERT, (destination.name, message_id, payload, priority or 0, available, expires))
        self._loop_commits = 0  # this connection's commit checkpointed the WAL if it was due
        self._maybe_housekeep(now)

    def publish_many(self, items: Sequence[Outgoing]) -> None:
        db = self._conn()
        now = time.time()
        with Txn(db):
            rows = []
            for it in items:
                available = now + (it.delay or 0.0)
                row = (it.message_id, it.payload, it.priority or 0, available, available + it.ttl if it.ttl else None)
                if isinstance(it.destination, Topic):
                    rows += [(name, *row) for name in self._targets(db, it.destination.name, now)]
                else:
                    rows.append((it.destination.name, *row))
            db.executemany(_INSERT, rows)
        self._maybe_housekeep(now)

    def fast_publisher(self, destination: Destination) -> tuple[bytes, Callable[[bytes], object]] | None:
        """A queue's plain send without publish()'s call chain (its id read from the frame)."""
        if not isinstance(destination, Queue):
            return None  # a topic message goes to every matching subscription: publish()
        db, name = self._conn(), destination.name

        def send(frame: bytes) -> None:
            now = time.time()
            db.execute(_INSERT, (name, _frame_id(frame), frame, 0, now, None))
            self._loop_commits = 0  # this connection's commit checkpointed the WAL if it was due
            if now >= self._next_housekeeping:
                self._housekeep()

        return b"", send

    def nowait_publisher(self, destination: Destination) -> Callable[[bytes], bool] | None:
        """fast_publisher's send on the loop-side connection: ``False`` (nothing inserted) where
        it would wait for another connection's write lock, where housekeeping or a WAL
        checkpoint is due (the thread path does them), and for a frame over LOOP_MAX_PAYLOAD."""
        ndb = self.ndb
        if ndb is None or not isinstance(destination, Queue):
            return None
        name = destination.name

        def send(frame: bytes) -> bool:
            now = time.time()
            if len(frame) > LOOP_MAX_PAYLOAD or now >= self._next_housekeeping or self._loop_commits >= LOOP_COMMITS:
                return False  # the twin's thread path sends next: its connection does these
            try:
                ndb.execute(_INSERT, (name, _frame_id(frame), frame, 0, now, None))
            except sqlite3.OperationalError:  # busy or locked: nothing was inserted
                return False
            self._loop_commits += 1
            return True

        return send

    @staticmethod
    def _targets(db: sqlite3.Connection, topic: str, now: float) -> list[str]:
        rows = db.execute(
            "SELECT name, pattern FROM mq_subscriptions WHERE lease_until IS NULL OR lease_until >= ?", (now,)
        ).fetchall()
        return [name for name, pattern in rows if matches(pattern, topic)]

    # -- receiving ------------------------------------------------------------------------
    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        return SqliteSubscription(self.opts, destination, prefetch, subscription)

    def delete_queue(self, name: str) -> None:
        db = self._conn()
        with Txn(db):
            drop_queue(db, name)

    # -- status ---------------------------------------------------------------------------
    def status(self, message_id: str) -> Status:
        db = self._conn()
        now = time.time()
        best = Status.UNKNOWN
        rows = db.execute(
            "SELECT available_at, expires_at, owner, state FROM mq_messages WHERE mid = ?", (message_id,)
        ).fetchall()
        for available_at, expires_at, owner, state in rows:
            if state == DONE:
                st = Status.DONE
            elif state == DEAD:
                st = Status.DEAD
            elif expires_at is not None and expires_at <= now:
                continue
            elif available_at > now:
                st = Status.RESERVED if owner is not None else Status.DELAYED
            else:
                st = Status.READY
            if _RANK[st] > _RANK[best]:
                best = st
        return best

    def stats(self, destination: Queue) -> QueueStats:
        now = time.time()
        ready, delayed, reserved = self._conn().execute(_STATS, (now, now, now, now, now, destination.name)).fetchone()
        (dead,) = self._conn().execute(
            "SELECT count(*) FROM mq_messages WHERE queue = ? AND state = 1", (f"{destination.name}.dead",)
        ).fetchone()
        return QueueStats(destination.name, ready=ready or 0, delayed=delayed or 0, reserved=reserved or 0,
                          dead=dead, consumers=None)

    # -- housekeeping ---------------------------------------------------------------------
    def _maybe_housekeep(self, now: float) -> None:
        if now >= self._next_housekeeping:
            self._housekeep()

    def _housekeep(self) -> None:
        self._next_housekeeping = time.time() + HOUSEKEEP_EVERY
        housekeep(self._conn(), self.opts)


def _frame_id(frame: bytes) -> str:
    """The id of a new envelope (fast_publisher's frames are fresh_format's)."""
    if frame.startswith(_ID_AT):
        start = len(_ID_AT)
        return frame[start:frame.index(b'"', start)].decode()
    return str(msgspec.json.decode(frame)["id"])  # not fresh_format's layout: the JSON says
