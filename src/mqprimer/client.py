"""The portable API: connect, Connection, Producer, Consumer.

Everything that is the same on every broker lives here once: envelopes, capability
checks, size limits, attempt counting, emulated retry and dead letters, TTL checks,
failover across URLs and reconnect with backoff.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._endpoint import Endpoint
from ._replies import Replies, dropped_counts, request
from .backend import Backend, Capabilities, Destination, Outgoing, Queue, QueueStats, Status, Topic
from .consumer import Consumer
from .deadletters import DeadLetters
from .destinations import _QUEUE_NAME, as_destination, is_pattern
from .envelope import DEFAULT_MAX_SIZE
from .errors import AuthenticationError, ConfigurationError, ConnectionFailed, MessageTooLarge, StateError
from .message import Message
from .producer import Producer
from .retry import RetryPolicy
from .url import URL

log = logging.getLogger("mqprimer")

_SOURCE = f"urn:mqprimer:{socket.gethostname()}"


def default_url() -> str:
    """``MQPRIMER_URL``, else a sqlite file under ``$XDG_DATA_HOME/mqprimer/`` (``~/.local/share``)."""
    env = os.environ.get("MQPRIMER_URL")
    if env:
        return env
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mqprimer"
    return f"sqlite:///{base / 'default.db'}"


class Connection:
    """Connections to one or more broker URLs (failover in list order)."""

    def __init__(
        self,
        urls: Sequence[URL],
        *,
        max_message_size: int = DEFAULT_MAX_SIZE,
        reconnect_timeout: float = 30.0,
        source: str = _SOURCE,
    ) -> None:
        if not urls:
            raise ConfigurationError("connect() needs at least one URL")
        self.urls = tuple(urls)
        self.endpoints = [Endpoint(u) for u in urls]
        self.max_message_size = max_message_size
        self.reconnect_timeout = reconnect_timeout
        self.source = source
        self._active = 0
        self._closed = False
        self._children: list[Producer | Consumer] = []
        self._limits: dict[int, tuple[object, tuple[int, str]]] = {}
        self._fast: tuple[Backend, int, tuple[type, ...], bool] | None = None  # see _check_one
        self._replies: Replies | None = None  # made by the first request()
        self._replies_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------
    def _open(self) -> None:
        errors: list[BaseException] = []
        for ep in self.endpoints:
            try:
                ep.ensure()
            except (ConnectionFailed, OSError) as exc:
                errors.append(exc)
        if len(errors) == len(self.endpoints):
            auth = [e for e in errors if isinstance(e, AuthenticationError)]
            if auth:
                raise auth[0]
            if len(errors) == 1:
                raise errors[0]
            raise ConnectionFailed("no broker reachable: " + "; ".join(str(e) for e in errors))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for child in list(self._children):
            child.close()
        if self._replies is not None:
            self._replies.close()
        for ep in self.endpoints:
            ep.reset()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self) -> None:
        if self._closed:
            raise StateError("the connection is closed")

    def _detach(self, child: object) -> None:
        """Forget a closed producer or consumer."""
        self._children = [c for c in self._children if c is not child]

    # -- public --------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        """What the (first) backend of this connection can do."""
        return self.endpoints[0].capabilities

    def producer(self) -> "Producer":
        self._check()
        p = Producer(self)
        self._children.append(p)
        return p

    def consumer(
        self,
        destination: "str | Destination",
        *,
        prefetch: int = 10,
        subscription: str | None = None,
        retry: RetryPolicy | None = None,
    ) -> "Consumer":
        """Receive from a queue (``str``) or a topic / topic pattern (:class:`Topic`).

        ``subscription`` names a durable topic subscription; ``retry`` is the policy used
        by :meth:`Message.fail`.
        """
        self._check()
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        dest = as_destination(destination, pattern=True)
        if subscription is not None and (not isinstance(dest, Topic) or not _QUEUE_NAME.match(subscription)):
            raise ValueError("subscription= names a topic subscription: a Topic destination and a queue-like name")
        c = Consumer(self, dest, prefetch, subscription, retry or RetryPolicy())
        self._children.append(c)
        return c

    def request(
        self,
        destination: str,
        body: Any,
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        type: str | None = None,
    ) -> Message:
        """Send a request to a queue and wait for its reply (docs/request-reply.md).

        Returns the reply :class:`Message` (already settled). Raises
        :class:`~mqprimer.errors.Timeout` when no reply comes within ``timeout`` seconds
        (the request expires then too: its ``ttl`` is the timeout) and
        :class:`~mqprimer.errors.RemoteError` when the service failed the request.
        Safe from many threads at once: one reply path per connection, made on the
        first call and removed on :meth:`close`.
        """
        self._check()
        return request(self, destination, body, timeout, headers, type)

    @property
    def dropped_replies(self) -> dict[str, int]:
        """Replies dropped so far: ``duplicate`` (a second reply to one request),
        ``late`` (after its caller's timeout) and ``invalid`` (not an envelope)."""
        return dropped_counts(self._replies)

    def status(self, message_id: str) -> Status:
        """Where a message is (backends with ``status`` capability)."""
        self._check()
        self.capabilities.require("status", "message status")
        result = Status.UNKNOWN
        for ep in self.endpoints:
            try:
                result = ep.call("status", lambda b: b.status(message_id))
            except ConnectionFailed:
                if len(self.endpoints) == 1:
                    raise
                continue
            if result is not Status.UNKNOWN:
                return result
        return result

    def stats(self, queue: str) -> QueueStats:
        """What the broker can tell about ``queue`` (backends with ``stats`` capability).

        Counts the broker cannot tell are ``None``. With several URLs, the counts of every
        reachable endpoint are added up (a count unknown on one is unknown in the sum).
        """
        self._check()
        self.capabilities.require("stats", "queue stats (conn.stats)")
        dest = as_destination(queue)
        if not isinstance(dest, Queue):
            raise ValueError("stats() takes a queue name (a str), not a Topic")
        parts: list[QueueStats] = []
        for ep in self.endpoints:
            try:
                parts.append(ep.call("stats", lambda b: b.stats(dest)))
            except ConnectionFailed:
                if len(self.endpoints) == 1:
                    raise
        if not parts:
            raise ConnectionFailed(f"stats of {dest.name}: no broker reachable")
        counts: dict[str, int | None] = {}
        for key in QueueStats.COUNTS:
            values = [getattr(p, key) for p in parts]
            counts[key] = None if None in values else sum(values)
        return QueueStats(dest.name, **counts)

    def dead_letters(self, queue: str) -> DeadLetters:
        """List, replay and purge the dead letters of ``queue``."""

        self._check()
        as_destination(queue)
        self.capabilities.require("dead_letter", "dead letters")
        return DeadLetters(self, queue)

    # -- internals used by Producer and Consumer -------------------------------------
    def size_limit(self, ep: Endpoint) -> tuple[int, str]:
        backend = ep.backend
        cached = self._limits.get(id(ep))
        if cached is not None and cached[0] is backend:
            return cached[1]
        limit = self._size_limit(ep)
        self._limits[id(ep)] = (backend, limit)
        return limit

    def _size_limit(self, ep: Endpoint) -> tuple[int, str]:
        caps = ep.capabilities
        if caps.max_message_size is not None and caps.max_message_size < self.max_message_size:
            hint = f" ({caps.size_limit_hint})" if caps.size_limit_hint else ""
            return caps.max_message_size, f"the {caps.name} broker's limit{hint}"
        return self.max_message_size, "mqprimer's max_message_size"

    def publish(self, items: Sequence[Outgoing]) -> None:
        """Publish with failover across endpoints and reconnect with backoff."""
        if len(items) == 1:
            it = items[0]
            self.publish_one(it.destination, it.payload, it.message_id, it.priority, it.delay, it.ttl)
        else:
            self._publish_slow(items)

    def publish_one(
        self, dest: Destination, payload: bytes, message_id: str,
        priority: int | None = None, delay: float | None = None, ttl: float | None = None,
    ) -> None:
        """:meth:`publish` of one message, without building an :class:`Outgoing` first."""
        ep = self.endpoints[self._active]
        backend = ep.backend
        if backend is not None:
            # fast path: the active endpoint is connected
            fast = self._fast
            if (fast is None or fast[0] is not backend or priority is not None or delay
                    or dest.__class__ not in fast[2] or len(payload) > fast[1] or ttl is not None and not fast[3]):
                self._check_one(ep, backend, Outgoing(dest, payload, message_id, priority, delay, ttl))
            try:
                with ep.lock:
                    if ep.backend is backend:
                        backend.publish(dest, payload, message_id=message_id, priority=priority, delay=delay, ttl=ttl)
                        return
            except Exception as exc:
                err = ep.translate(exc, "publish")
                if not isinstance(err, ConnectionFailed):
                    raise err from None
                ep.reset()
                log.warning("publish to %s failed (%s); reconnecting", ep.url, err)
        self._publish_slow([Outgoing(dest, payload, message_id, priority, delay, ttl)])

    def _fast_failed(self, ep: Endpoint, exc: Exception, dest: Destination, payload: bytes, mid: str) -> None:
        """A driver's fast send (Producer.send) failed: what publish_one does when publish fails."""
        err = ep.translate(exc, "publish")
        if not isinstance(err, ConnectionFailed):
            raise err from None
        ep.reset()
        log.warning("publish to %s failed (%s); reconnecting", ep.url, err)
        self._publish_slow([Outgoing(dest, payload, mid)])

    def _check_one(self, ep: Endpoint, backend: Backend, it: Outgoing) -> None:
        """Capability and size checks; remember when plain queue messages need none."""
        caps = backend.capabilities
        _check_send_caps(caps, [it])
        _check_size(self, ep, [it])
        kinds = ((Queue,) if caps.queue else ()) + ((Topic,) if caps.topic else ())
        if kinds:
            # until this backend is replaced, a message to a destination of these kinds
            # without priority or delay (and ttl where declared) within this size is known
            # to be acceptable
            self._fast = (backend, self.size_limit(ep)[0], kinds, bool(caps.ttl))

    def _publish_slow(self, items: Sequence[Outgoing]) -> None:
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.05
        n = len(self.endpoints)
        while True:
            last: BaseException | None = None
            for i in range(n):
                idx = (self._active + i) % n
                ep = self.endpoints[idx]
                try:
                    _check_send_caps(ep.capabilities, items)
                    _check_size(self, ep, items)
                    ep.call("publish", lambda b: _publish_items(b, items))
                except AuthenticationError as exc:
                    last = exc
                    if n == 1:
                        raise
                    continue
                except ConnectionFailed as exc:
                    last = exc
                    if idx == self._active and n > 1:
                        log.warning("failing over from %s: %s", ep.url, exc)
                    continue
                if idx != self._active:
                    self._active = idx
                return
            if time.monotonic() >= deadline or isinstance(last, AuthenticationError):
                assert last is not None
                raise last
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _publish_items(backend: Backend, items: Sequence[Outgoing]) -> None:
    if len(items) == 1:
        it = items[0]
        backend.publish(it.destination, it.payload, message_id=it.message_id,
                        priority=it.priority, delay=it.delay, ttl=it.ttl)
    else:
        backend.publish_many(items)


def _check_send_caps(caps: Capabilities, items: Sequence[Outgoing]) -> None:
    for it in items:
        if isinstance(it.destination, Topic):
            caps.require("topic", "publish-subscribe (Topic destinations)")
        else:
            caps.require("queue", "queues")
        if it.priority is not None:
            caps.require("priority", "message priority")
        if it.delay:
            caps.require("delay", "delayed delivery")
        if it.ttl is not None:
            caps.require("ttl", "message expiry (ttl)")


def _check_size(conn: Connection, ep: Endpoint, items: Sequence[Outgoing]) -> None:
    limit, what = conn.size_limit(ep)
    for it in items:
        if len(it.payload) > limit:
            raise MessageTooLarge(
                f"message {it.message_id} is {len(it.payload):,} bytes encoded, over {what} of "
                f"{limit:,} bytes; send a reference (a path or URL) instead of the data"
            )


__all__ = ["Connection", "Consumer", "Producer", "as_destination", "default_url", "is_pattern"]
