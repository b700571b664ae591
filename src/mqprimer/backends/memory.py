"""``memory://[name]``: an in-process broker with every capability; the reference backend.

Connections in one process that use the same name share one broker. Nothing survives
the process; delivery is at-least-once within it (unsettled messages go back on close).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

from ..backend import (
    EMULATED,
    NATIVE,
    Backend,
    Capabilities,
    Delivery,
    Destination,
    Queue,
    QueueStats,
    Status,
    Subscription,
    Topic,
)
from ..topics import matches

CAPABILITIES = Capabilities(
    name="memory",
    topic=NATIVE,
    patterns=NATIVE,
    priority=NATIVE,
    delay=NATIVE,
    ttl=NATIVE,
    retry=NATIVE,
    dead_letter=NATIVE,
    status=NATIVE,
    request_reply=EMULATED,  # the portable private reply queue (backend.QueueReplyPath)
    stats=NATIVE,
    shared_subscription=NATIVE,  # one queue per subscription name; its consumers compete for it
    nowait=("poll", "ack"),  # in-process work under a lock nobody holds across a wait
    confirmed_send=True,
    persistent=False,
    guarantee="at-least-once",
    notes="in-process only; lost when the process exits",
)
_STATUS_KEEP = 100_000  # settled ids remembered for status()


@dataclass(slots=True)
class _Item:
    seq: int
    mid: str
    payload: bytes
    expires: float | None = None
    priority: int = 0


# heap entries are plain tuples: comparing dataclasses cost ~40% of receive on deep queues
_Ready = tuple[int, int, _Item]  # (-priority, seq, item)


class _Q:
    __slots__ = ("ready", "delayed", "inflight", "consumers", "enqueued", "dequeued")

    def __init__(self) -> None:
        self.consumers = self.enqueued = self.dequeued = 0
        self.ready: list[_Ready] = []
        self.delayed: list[tuple[float, int, _Item]] = []
        self.inflight: dict[int, tuple[_Item, str]] = {}


class _Broker:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queues: dict[str, _Q] = {}
        self.subs: dict[str, str] = {}  # subscription queue -> pattern
        self.status: dict[str, Status] = {}
        self.settled: deque[str] = deque()  # settled ids, oldest first, for bounded forgetting
        self.seq = itertools.count()

    def q(self, name: str) -> _Q:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Q()
        return q

    def put(self, name: str, mid: str, payload: bytes, priority: int, delay: float, ttl: float | None) -> None:
        now = time.monotonic()
        item = _Item(next(self.seq), mid, payload, now + delay + ttl if ttl else None, priority)
        q = self.q(name)
        q.enqueued += 1
        if delay > 0:
            heapq.heappush(q.delayed, (now + delay, item.seq, item))
            self.status[mid] = Status.DELAYED
        else:
            heapq.heappush(q.ready, (-priority, item.seq, item))
            self.status[mid] = Status.READY

    def wake(self) -> None:
        # Condition.notify_all is costly even with nobody waiting; its waiter list is
        # the cheapest way to know (the attribute has been there since Python 2)
        if self.cond._waiters:  # type: ignore[attr-defined]
            self.cond.notify_all()

    def set_status(self, mid: str, st: Status) -> None:
        self.status[mid] = st
        if st is Status.DONE or st is Status.DEAD:
            self.settled.append(mid)
            if len(self.settled) > _STATUS_KEEP:
                old = self.settled.popleft()
                if self.status.get(old) in (Status.DONE, Status.DEAD):
                    del self.status[old]


_brokers: dict[str, _Broker] = {}
_brokers_lock = threading.Lock()


def _broker(name: str) -> _Broker:
    with _brokers_lock:
        b = _brokers.get(name)
        if b is None:
            b = _brokers[name] = _Broker()
        return b


class MemoryBackend(Backend):
    capabilities = CAPABILITIES
    connection_errors = ()

    def open(self) -> None:
        self.broker = _broker(self.url.host or "default")

    def close(self) -> None:
        pass

    def publish(
        self, destination: Destination, payload: bytes, *, message_id: str,
        priority: int | None = None, delay: float | None = None, ttl: float | None = None,
    ) -> None:
        b = self.broker
        with b.cond:
            if isinstance(destination, Topic):
                targets = [q for q, pat in b.subs.items() if matches(pat, destination.name)]
            else:
                targets = [destination.name]
            for t in targets:
                b.put(t, message_id, payload, priority or 0, delay or 0.0, ttl)
            b.wake()

    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        b = self.broker
        if isinstance(destination, Topic):
            name = subscription or f"_sub.{uuid.uuid4().hex[:12]}"
            with b.cond:
                b.subs[name] = destination.name
                b.q(name)
            return _MemorySub(b, destination, name, durable=subscription is not None)
        return _MemorySub(b, destination, destination.name, durable=True)

    def delete_queue(self, name: str) -> None:
        with self.broker.cond:
            self.broker.queues.pop(name, None)

    def status(self, message_id: str) -> Status:
        with self.broker.cond:
            return self.broker.status.get(message_id, Status.UNKNOWN)

    def stats(self, destination: Queue) -> QueueStats:
        b = self.broker
        now = time.monotonic()
        with b.cond:
            q = b.queues.get(destination.name) or _Q()
            dead = b.queues.get(f"{destination.name}.dead") or _Q()
            due = sum(1 for at, _, _ in q.delayed if at <= now)  # ready, moved over on the next receive
            live = sum(1 for _, _, it in q.ready if it.expires is None or it.expires > now)
            return QueueStats(destination.name, ready=live + due, delayed=len(q.delayed) - due,
                              reserved=len(q.inflight), dead=len(dead.ready) + len(dead.inflight),
                              consumers=q.consumers, enqueued=q.enqueued, dequeued=q.dequeued)


class _MemorySub(Subscription):
    def __init__(self, broker: _Broker, destination: Destination, qname: str, durable: bool) -> None:
        self.b = broker
        self.destination = destination
        self.qname = qname
        self.durable = durable
        self.retry_target = Queue(qname)
        self.dead_target = Queue(f"{qname}.dead")
        self.tags: set[int] = set()
        with broker.cond:
            self.q = broker.q(qname)  # a queue object lives as long as any subscription to it
            self.q.consumers += 1
        self.attached = True

    def receive(self, timeout: float | None) -> Delivery | None:
        b = self.b
        deadline = None if timeout is None else time.monotonic() + timeout
        q = self.q
        with b.cond:
            while True:
                now = time.monotonic()
                while q.delayed and q.delayed[0][0] <= now:
                    due = heapq.heappop(q.delayed)[2]
                    heapq.heappush(q.ready, (-due.priority, due.seq, due))
                while q.ready:
                    item = heapq.heappop(q.ready)[2]
                    if item.expires is not None and item.expires <= now:
                        q.dequeued += 1
                        b.status[item.mid] = Status.UNKNOWN
                        continue
                    tag = item.seq
                    q.inflight[tag] = (item, self.qname)
                    self.tags.add(tag)
                    b.status[item.mid] = Status.RESERVED
                    return Delivery(item.payload, tag)
                wait = None if deadline is None else deadline - now
                if q.delayed:
                    until = q.delayed[0][0] - now
                    wait = until if wait is None else min(wait, until)
                if wait is not None and wait <= 0:
                    return None
                b.cond.wait(wait)

    def _take(self, d: Delivery, gone: bool = True) -> _Item:
        item, _ = self.q.inflight.pop(d.tag)
        self.q.dequeued += gone
        self.tags.discard(d.tag)
        return item

    def ack(self, d: Delivery) -> None:
        with self.b.cond:
            self.b.set_status(self._take(d).mid, Status.DONE)

    def requeue(self, d: Delivery) -> None:
        with self.b.cond:
            item = self._take(d, gone=False)
            heapq.heappush(self.q.ready, (-item.priority, item.seq, item))
            self.b.status[item.mid] = Status.READY
            self.b.wake()

    def retry(self, d: Delivery, payload: bytes, delay: float) -> None:
        with self.b.cond:
            item = self._take(d)
            ttl = None if item.expires is None else max(item.expires - time.monotonic() - delay, 0.001)
            self.b.put(self.qname, item.mid, payload, item.priority, delay, ttl)
            self.b.wake()

    def dead_letter(self, d: Delivery, payload: bytes, reason: str) -> None:
        with self.b.cond:
            item = self._take(d)
            self.b.put(self.dead_target.name, item.mid, payload, 0, 0.0, None)
            self.b.set_status(item.mid, Status.DEAD)
            self.b.wake()

    def close(self) -> None:
        b = self.b
        with b.cond:
            q = self.q
            for tag in list(self.tags):
                item, _ = q.inflight.pop(tag)
                heapq.heappush(q.ready, (-item.priority, item.seq, item))
                b.status[item.mid] = Status.READY
            self.tags.clear()
            if self.attached:  # close() may be called again
                q.consumers -= 1
                self.attached = False
            if not self.durable:
                b.subs.pop(self.qname, None)
                b.queues.pop(self.qname, None)
            b.wake()
