"""List, replay and purge a queue's dead letters, from Python and the CLI.

Backends with a native store (beanstalkd's buried jobs) provide a
:class:`~mqprimer.backend.DeadLetterStore`; everywhere else dead letters are ordinary
messages in ``<queue>.dead`` and this module consumes that queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from ._endpoint import Endpoint
from .backend import Backend, Capabilities, DeadLetterStore, Outgoing, Queue, QueueStats
from .consumer import Consumer
from .envelope import Envelope, decode, encode, make, replace
from .errors import ConnectionFailed, EnvelopeError, MQError

_FIRST_WAIT = 1.0  # how long an empty dead-letter queue is waited on before it counts as empty
_NEXT_WAIT = 0.3
# longest a listing waits for dead letters the broker counts but has not handed over yet (a
# previous listing's connection being given back, on a loaded broker)
_HELD_WAIT = 10.0
T = TypeVar("T")
log = logging.getLogger("mqprimer")


class _Conn(Protocol):
    """What dead-letter handling uses of a :class:`~mqprimer.Connection` (which imports this module)."""

    @property
    def endpoints(self) -> Sequence[Endpoint]: ...

    def consumer(self, destination: str, *, prefetch: int) -> Consumer: ...

    def publish(self, items: Sequence[Outgoing]) -> None: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def stats(self, queue: str) -> QueueStats: ...

    def _check(self) -> None: ...


class DeadLetters:
    """The dead letters of one queue (``conn.dead_letters("thumbnails")``)."""

    def __init__(self, conn: _Conn, queue: str) -> None:
        self._conn = conn
        self.queue = queue
        self.dead_queue = f"{queue}.dead"

    def _native(self, fn: "Callable[[DeadLetterStore], T]") -> "list[T] | None":
        """``fn`` on the native store of every endpoint (each broker of a URL list keeps its
        own dead letters), or ``None`` when the backend has no native store. A broker that is
        down is skipped with a warning unless it is the only one."""
        eps = self._conn.endpoints
        out: list[T] = []

        def run(b: Backend) -> "tuple[T] | None":
            store = b.dead_letter_store(self.queue)
            return None if store is None else (fn(store),)

        for ep in eps:
            try:
                r = ep.call("dead letters", run)
            except ConnectionFailed as exc:
                if len(eps) == 1:
                    raise
                log.warning("dead letters of %s on %s skipped: %s", self.queue, ep.url, exc)
                continue
            if r is None:
                return None
            out.append(r[0])
        if not out:
            raise ConnectionFailed(f"dead letters of {self.queue}: no broker reachable")
        return out

    def list(self, limit: int = 100) -> list[Envelope]:
        """Up to ``limit`` dead letters (with ``reason``, ``origin``, ``attempt``), left in place."""
        left = [limit]

        def take(store: DeadLetterStore) -> list[bytes]:
            got = store.list(left[0]) if left[0] > 0 else []
            left[0] -= len(got)
            return got

        native = self._native(take)
        if native is not None:
            return [_decode_any(p) for got in native for p in got]
        out: list[Envelope] = []
        with self._consumer(limit) as consumer:
            for msg in _drain(consumer, limit, self._held):
                out.append(msg.envelope)
        return out

    def replay(self, limit: int | None = None, ids: set[str] | None = None) -> int:
        """Send dead letters back to the queue with a fresh attempt count; return how many."""
        done = [0]

        def replay(store: DeadLetterStore) -> int:
            if limit is not None and done[0] >= limit:
                return 0
            n = store.replay(None if limit is None else limit - done[0], ids)
            done[0] += n
            return n

        native = self._native(replay)
        if native is not None:
            return sum(native)
        n = 0
        with self._consumer(100) as consumer:
            for msg in _drain(consumer, None, self._held):
                if ids is not None and msg.id not in ids:
                    continue  # left unsettled: back in the dead-letter queue on close
                env = replace(msg.envelope, attempt=1, reason=None, origin=None)
                self._conn._check()
                payload = encode(env, 1 << 62, original=msg._delivery.payload)
                self._conn.publish([Outgoing(Queue(self.queue), payload, env.id)])
                msg.ack()
                n += 1
                if limit is not None and n >= limit:
                    break
        return n

    def purge(self) -> int:
        """Delete every dead letter; return how many."""
        native = self._native(lambda store: store.purge())
        if native is not None:
            return sum(native)
        n = 0
        with self._consumer(100) as consumer:
            for msg in _drain(consumer, None, self._held):
                msg.ack()
                n += 1
        return n

    def _consumer(self, prefetch: int) -> Consumer:
        return self._conn.consumer(self.dead_queue, prefetch=max(1, min(prefetch, 1000)))

    def _held(self, seen: int) -> bool:
        """The broker counts more dead letters than the ``seen`` ones handed over: a gearmand
        or RabbitMQ that has not yet taken back what a previous listing's consumer held.
        Counted where the backend reports queue stats (``conn.stats``)."""
        conn = self._conn
        if not conn.capabilities.stats:
            return False
        try:
            dead = conn.stats(self.queue).dead
        except MQError:
            return False
        return dead is not None and dead > seen


def _drain(consumer: Consumer, limit: int | None, held: "Callable[[int], bool]"):  # type: ignore[no-untyped-def]
    wait = _FIRST_WAIT
    seen = 0
    held_until = time.monotonic() + _HELD_WAIT
    while limit is None or seen < limit:
        msg = consumer.receive(timeout=wait)
        if msg is None:
            if time.monotonic() < held_until and held(seen):
                continue
            return
        wait = _NEXT_WAIT
        seen += 1
        yield msg


def _decode_any(payload: bytes) -> Envelope:
    try:
        return decode(payload, max(len(payload), 1))
    except EnvelopeError as exc:
        return make(id="?", source="?", type="mqprimer.invalid", body=payload, reason=f"invalid envelope: {exc}")
