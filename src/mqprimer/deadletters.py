"""List, replay and purge a queue's dead letters, from Python and the CLI.

Backends with a native store (beanstalkd's buried jobs) provide a
:class:`~mqprimer.backend.DeadLetterStore`; everywhere else dead letters are ordinary
messages in ``<queue>.dead`` and this module consumes that queue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backend import DeadLetterStore, Outgoing, Queue
from .envelope import Envelope, decode, encode, make, replace
from .errors import EnvelopeError

if TYPE_CHECKING:  # pragma: no cover
    from .client import Connection
    from .consumer import Consumer

_FIRST_WAIT = 1.0  # how long an empty dead-letter queue is waited on before it counts as empty
_NEXT_WAIT = 0.3


class DeadLetters:
    """The dead letters of one queue (``conn.dead_letters("thumbnails")``)."""

    def __init__(self, conn: "Connection", queue: str) -> None:
        self._conn = conn
        self.queue = queue
        self.dead_queue = f"{queue}.dead"

    def _store(self) -> DeadLetterStore | None:
        return self._conn.endpoints[0].call("dead letters", lambda b: b.dead_letter_store(self.queue))

    def list(self, limit: int = 100) -> list[Envelope]:
        """Up to ``limit`` dead letters (with ``reason``, ``origin``, ``attempt``), left in place."""
        store = self._store()
        if store is not None:
            return [_decode_any(p) for p in store.list(limit)]
        out: list[Envelope] = []
        with self._consumer(limit) as consumer:
            for msg in _drain(consumer, limit):
                out.append(msg.envelope)
        return out

    def replay(self, limit: int | None = None, ids: set[str] | None = None) -> int:
        """Send dead letters back to the queue with a fresh attempt count; return how many."""
        store = self._store()
        if store is not None and ids is None:
            return store.replay(limit)
        producer = self._conn.producer()
        n = 0
        with self._consumer(100) as consumer:
            for msg in _drain(consumer, None):
                if ids is not None and msg.id not in ids:
                    continue  # left unsettled: back in the dead-letter queue on close
                env = replace(msg.envelope, attempt=1, reason=None, origin=None)
                producer._check()
                payload = encode(env, 1 << 62, original=msg._delivery.payload)
                self._conn.publish([Outgoing(Queue(self.queue), payload, env.id)])
                msg.ack()
                n += 1
                if limit is not None and n >= limit:
                    break
        return n

    def purge(self) -> int:
        """Delete every dead letter; return how many."""
        store = self._store()
        if store is not None:
            return store.purge()
        n = 0
        with self._consumer(100) as consumer:
            for msg in _drain(consumer, None):
                msg.ack()
                n += 1
        return n

    def _consumer(self, prefetch: int) -> "Consumer":
        return self._conn.consumer(self.dead_queue, prefetch=max(1, min(prefetch, 1000)))


def _drain(consumer: "Consumer", limit: int | None):  # type: ignore[no-untyped-def]
    wait = _FIRST_WAIT
    seen = 0
    while limit is None or seen < limit:
        msg = consumer.receive(timeout=wait)
        if msg is None:
            return
        wait = _NEXT_WAIT
        seen += 1
        yield msg


def _decode_any(payload: bytes) -> Envelope:
    try:
        return decode(payload, max(len(payload), 1))
    except EnvelopeError as exc:
        return make(id="?", source="?", type="mqprimer.invalid", body=payload, reason=f"invalid envelope: {exc}")
