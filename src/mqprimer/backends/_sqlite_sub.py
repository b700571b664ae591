"""The sqlite backend's subscription: reserve rows in batches, settle them one by one.

Each subscription has its own sqlite connection (the portable layer may settle from a
handler thread while a producer on the same Connection publishes) and a random owner
token. Reserving sets ``owner`` (the token and a batch number) and pushes ``available_at``
to now + visibility timeout, so a reservation lapses by itself when its process dies; every
settle checks the owner, so a process whose reservation lapsed cannot settle a message
someone else holds now.
"""

from __future__ import annotations

import collections
import sqlite3
import time
import uuid

from ..backend import Delivery, Destination, Queue, Subscription, Topic
from ._sqlite_db import (
    HOUSEKEEP_EVERY,
    LOOP_COMMITS,
    LOOP_MAX_BATCH,
    LOOP_MAX_PAYLOAD,
    Options,
    Txn,
    connect_db,
    drop_queue,
    housekeep,
    loop_db,
)

_MIN_NAP, _MAX_NAP = 0.005, 0.05  # adaptive poll interval: sqlite has no notifications
_PRIVATE_LEASE_MIN = 60.0  # a private subscription lives this long without a receive() call

_AVAILABLE = "queue = ? AND state < 2 AND available_at <= ? AND (expires_at IS NULL OR expires_at > ?)"
_PROBE = f"SELECT 1 FROM mq_messages WHERE {_AVAILABLE} LIMIT 1"
_RESERVE = (
    "UPDATE mq_messages SET owner = ?, available_at = ?, deliveries = deliveries + 1 WHERE seq IN "
    f"(SELECT seq FROM mq_messages WHERE {_AVAILABLE} ORDER BY priority DESC, seq LIMIT ?) "
    "RETURNING seq, payload, priority, deliveries"
)
# on the event loop: the same rows, as many of them as fit in LOOP_MAX_BATCH bytes of payload
# (length() reads a blob's size from its record header, not the blob)
_RESERVE_LOOP = (
    "UPDATE mq_messages SET owner = ?, available_at = ?, deliveries = deliveries + 1 WHERE seq IN "
    "(SELECT seq FROM (SELECT seq, sum(size) OVER (ORDER BY priority DESC, seq) AS upto FROM "
    f"(SELECT seq, priority, length(payload) AS size FROM mq_messages WHERE {_AVAILABLE} "
    "ORDER BY priority DESC, seq LIMIT ?)) WHERE upto <= ?) "
    "RETURNING seq, payload, priority, deliveries"
)
_ACK = "UPDATE mq_messages SET state = 2, payload = x'', owner = NULL WHERE seq = ? AND owner = ?"
_GIVE_BACK = (
    "UPDATE mq_messages SET owner = NULL, available_at = ?, deliveries = max(deliveries - 1, 0) "
    "WHERE seq = ? AND owner = ?"
)


class ReservationLost(Exception):
    """The visibility timeout ran out before the message was settled; it may be delivered again."""


class SqliteSubscription(Subscription):
    def __init__(self, opts: Options, destination: Destination, prefetch: int, subscription: str | None) -> None:
        self.opts = opts
        self.destination = destination
        self.prefetch = prefetch
        self.token = uuid.uuid4().hex
        self.private = isinstance(destination, Topic) and subscription is None
        if isinstance(destination, Topic):
            self.queue = subscription or f"_sub.{self.token[:16]}"
        else:
            self.queue = destination.name
        self.retry_target = Queue(self.queue)
        self.dead_target = Queue(f"{self.queue}.dead")
        self.batch = 0
        # (seq, owner) tags; buffered: (tag, payload, earlier lost deliveries, reserved at)
        self.buffer: collections.deque[tuple[tuple[int, str], bytes, int, float]] = collections.deque()
        self.unsettled: set[tuple[int, str]] = set()
        self.lease = max(_PRIVATE_LEASE_MIN, 4 * opts.visibility_timeout)  # of a private topic subscription
        self.delivery_lease = opts.visibility_timeout
        self.renew_at = 0.0
        self.housekeep_at = time.time() + HOUSEKEEP_EVERY
        self.db: sqlite3.Connection | None = connect_db(opts)
        self.ndb: sqlite3.Connection | None = None  # the event loop's (receive_nowait, ack_nowait)
        self.loop_commits = 0
        try:
            self.ndb = loop_db(opts)
            if isinstance(destination, Topic):
                self._register(time.time())
        except BaseException:
            self._close_db()
            raise

    def _register(self, now: float) -> None:
        db = self._db()
        lease = now + self.lease if self.private else None
        db.execute(
            "INSERT INTO mq_subscriptions (name, pattern, lease_until) VALUES (?, ?, ?) ON CONFLICT (name) "
            "DO UPDATE SET pattern = excluded.pattern, lease_until = excluded.lease_until",
            (self.queue, self.destination.name, lease),
        )
        self.renew_at = now + self.lease / 4

    def _db(self) -> sqlite3.Connection:
        if self.db is None:
            raise sqlite3.ProgrammingError("the sqlite subscription is closed")
        return self.db

    # -- receiving ------------------------------------------------------------------------
    def receive(self, timeout: float | None) -> Delivery | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        nap = _MIN_NAP
        while True:
            delivery = self._next_buffered()
            if delivery is not None:
                return delivery
            if self._reserve():
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            time.sleep(nap if left is None else min(nap, left))
            nap = min(nap * 2, _MAX_NAP)

    def _next_buffered(self, db: sqlite3.Connection | None = None) -> Delivery | None:
        vt = self.opts.visibility_timeout
        buffer = self.buffer
        while buffer:
            tag, payload, prior, reserved_at = buffer[0]
            now = time.time()
            if now - reserved_at > vt / 2:
                # buffered too long: extend the reservation, or drop it if it already lapsed
                # (taken from the buffer only once that is done: a busy loop-side update raises)
                cur = (db or self._db()).execute(
                    "UPDATE mq_messages SET available_at = ? WHERE seq = ? AND owner = ?", (now + vt, *tag)
                )
                if cur.rowcount != 1:
                    buffer.popleft()
                    continue
            buffer.popleft()
            self.unsettled.add(tag)
            return Delivery(payload, tag, extra_attempts=prior, broker_redelivered=prior > 0)
        return None

    def receive_nowait(self) -> Delivery | None:
        """``receive(0.0)`` on the asyncio twin's event loop, through the loop-side connection:
        ``None`` where it would wait (another connection holds the write lock: the statement
        did nothing) or where the thread-side connection should act (chores, a WAL checkpoint
        due: LOOP_COMMITS). Then the twin's receive waits on its thread, which reserves."""
        db = self.ndb
        if db is None:
            return self.receive(0.0)  # not reached: "poll" is declared only with a loop-side connection
        try:
            if self.buffer:
                d = self._next_buffered(db)
                if d is not None:
                    return d
            now = time.time()
            if now >= self.housekeep_at or self.private and now >= self.renew_at or self.loop_commits >= LOOP_COMMITS:
                return None  # until the thread's _reserve has run (the twin's receive waits there next)
            if not self._take(db, now, LOOP_MAX_BATCH):
                return None  # nothing there, or its next message alone is over LOOP_MAX_BATCH
            self.loop_commits += 1
            return self._next_buffered(db)
        except sqlite3.OperationalError:  # busy or locked: nothing was done
            return None

    def _reserve(self) -> bool:
        """Reserve a batch into the buffer; False if nothing is available."""
        now = time.time()
        self._chores(now)
        self.loop_commits = 0  # this connection's commit checkpoints the WAL if it is due
        return self._take(self._db(), now)

    def _take(self, db: sqlite3.Connection, now: float, max_bytes: int | None = None) -> bool:
        if db.execute(_PROBE, (self.queue, now, now)).fetchone() is None:
            return False
        n = max(1, self.prefetch - len(self.unsettled))
        self.batch += 1
        owner = f"{self.token}.{self.batch}"
        args: tuple[object, ...] = (owner, now + self.opts.visibility_timeout, self.queue, now, now, n)
        if max_bytes is None:
            rows = db.execute(_RESERVE, args).fetchall()
        else:
            rows = db.execute(_RESERVE_LOOP, (*args, max_bytes)).fetchall()
        rows.sort(key=lambda r: (-r[2], r[0]))  # RETURNING has no defined order
        self.buffer.extend(((seq, owner), payload, deliveries - 1, now) for seq, payload, _, deliveries in rows)
        return bool(rows)

    def _chores(self, now: float) -> None:
        if self.private and now >= self.renew_at:
            self._register(now)  # renews the lease; recreates the subscription if it was reaped
        if now >= self.housekeep_at:
            self.housekeep_at = now + HOUSEKEEP_EVERY
            housekeep(self._db(), self.opts)

    # -- settling -------------------------------------------------------------------------
    def _settled(self, d: Delivery, cur: sqlite3.Cursor, what: str) -> None:
        self.unsettled.discard(d.tag)
        if cur.rowcount != 1:
            raise ReservationLost(
                f"cannot {what}: the reservation ran out (visibility_timeout={self.opts.visibility_timeout:g}s) "
                "and the message was given to another consumer or settled already"
            )

    def ack(self, delivery: Delivery) -> None:
        # the row stays, without its payload, so that status() can answer DONE (housekeeping trims them)
        cur = self._db().execute(_ACK, delivery.tag)
        self.loop_commits = 0  # this connection's commit checkpointed the WAL if it was due
        self._settled(delivery, cur, "ack")

    def ack_nowait(self, delivery: Delivery) -> bool:
        """:meth:`ack` on the event loop; ``False``: nothing done (busy, the reservation lost:
        the thread's ack raises ReservationLost, a WAL checkpoint due: LOOP_COMMITS, or a
        payload over LOOP_MAX_PAYLOAD, whose overflow pages the update reads to free them)."""
        db = self.ndb
        if db is None or self.loop_commits >= LOOP_COMMITS or len(delivery.payload) > LOOP_MAX_PAYLOAD:
            return False  # until the thread's ack (which the twin calls next) has run
        try:
            cur = db.execute(_ACK, delivery.tag)
        except sqlite3.OperationalError:  # busy or locked: nothing was done
            return False
        if cur.rowcount != 1:
            return False
        self.loop_commits += 1
        self.unsettled.discard(delivery.tag)
        return True

    def touch(self, delivery: Delivery) -> None:
        cur = self._db().execute(
            "UPDATE mq_messages SET available_at = ? WHERE seq = ? AND owner = ?",
            (time.time() + self.opts.visibility_timeout, *delivery.tag),
        )
        if cur.rowcount != 1:
            self.unsettled.discard(delivery.tag)
            raise ReservationLost(
                f"cannot touch: the reservation ran out (visibility_timeout={self.opts.visibility_timeout:g}s) "
                "and the message was given to another consumer or settled already"
            )

    def requeue(self, delivery: Delivery) -> None:
        cur = self._db().execute(_GIVE_BACK, (time.time(), *delivery.tag))
        self._settled(delivery, cur, "requeue")

    def retry(self, delivery: Delivery, payload: bytes, delay: float) -> None:
        cur = self._db().execute(
            "UPDATE mq_messages SET payload = ?, owner = NULL, available_at = ?, deliveries = 0 "
            "WHERE seq = ? AND owner = ?",
            (payload, time.time() + delay, *delivery.tag),
        )
        self._settled(delivery, cur, "retry")

    def dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        cur = self._db().execute(
            "UPDATE mq_messages SET queue = ?, payload = ?, owner = NULL, available_at = ?, priority = 0, "
            "expires_at = NULL, deliveries = 0, state = 1 WHERE seq = ? AND owner = ?",
            (self.dead_target.name, payload, time.time(), *delivery.tag),
        )
        self._settled(delivery, cur, "dead-letter")

    def close(self) -> None:
        db = self.db
        if db is None:
            return
        try:
            tags = list(self.unsettled) + [b[0] for b in self.buffer]
            self.unsettled.clear()
            self.buffer.clear()
            with Txn(db):
                now = time.time()
                db.executemany(_GIVE_BACK, [(now, *tag) for tag in tags])
                if self.private:
                    drop_queue(db, self.queue)
        finally:
            self._close_db()

    def _close_db(self) -> None:
        db, self.db = self.db, None
        ndb, self.ndb = self.ndb, None
        if ndb is not None:
            ndb.close()
        if db is not None:
            db.close()
