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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ._endpoint import Endpoint
from ._ids import stamp, wire
from ._replies import Replies, check_headers, dropped_counts, request
from ._replies import check_type as _check_type
from .backend import Backend, Capabilities, Destination, Outgoing, Queue, QueueStats, Status, Topic
from .consumer import Consumer
from .deadletters import DeadLetters
from .destinations import _QUEUE_NAME, _queue_cache, _topic_names, as_destination, is_pattern
from .envelope import DEFAULT_MAX_SIZE, DEFAULT_TYPE, body_error, encode, fresh_format, make
from .errors import AuthenticationError, ConfigurationError, ConnectionFailed, MessageTooLarge, StateError
from .message import Message
from .retry import RetryPolicy
from .url import URL

log = logging.getLogger("mqprimer")

_SOURCE = f"urn:mqprimer:{socket.gethostname()}"
_BINARY = (bytes, bytearray, memoryview)
_encode_body = msgspec.json.Encoder().encode


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


def _check_options(priority: int | None, delay: float | None, ttl: float | None) -> None:
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9
    ):
        raise ValueError(f"priority must be an int from 0 (lowest) to 9 (most urgent), got {priority!r}")
    if delay is not None and delay < 0:
        raise ValueError(f"delay must be >= 0 seconds, got {delay}")
    if ttl is not None and ttl <= 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl}")


def _check_size(conn: Connection, ep: Endpoint, items: Sequence[Outgoing]) -> None:
    limit, what = conn.size_limit(ep)
    for it in items:
        if len(it.payload) > limit:
            raise MessageTooLarge(
                f"message {it.message_id} is {len(it.payload):,} bytes encoded, over {what} of "
                f"{limit:,} bytes; send a reference (a path or URL) instead of the data"
            )


class Producer:
    """Sends messages. ``send`` returns once the broker has the message (where it confirms)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._closed = False
        # type -> the envelope format of send()'s fast path (envelope.fresh_format)
        self._formats: dict[str | None, bytes] = {}
        # queue name -> (its Queue, endpoint, backend, endpoint index, {type: prefixed format},
        # the driver's send or None, frame size limit, prefix length, %-escaped prefix): _learn
        self._fast: dict[str, tuple[Any, ...]] = {}
        self._nowait: dict[str, tuple[Any, Any]] = {}  # queue name -> (backend, its nowait_publisher)

    def build(
        self,
        destination: "str | Destination",
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        type: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        ttl: float | None = None,
        id: str | None = None,
    ) -> Outgoing:
        """Validate and encode one message without sending it."""
        dest = as_destination(destination)
        check_headers(headers)
        _check_options(priority, delay, ttl)
        _check_type(type)
        mid, now = stamp()
        if id is not None:
            mid = id
        expires = None
        if ttl is not None:
            expires = int(time.time() * 1000) + int(((delay or 0) + ttl) * 1000)
        env = make(
            id=mid, source=self._conn.source, type=type or DEFAULT_TYPE, body=body,
            time=now, headers=headers, expires=expires,
        )
        payload = encode(env, max_size=self._conn.max_message_size)
        return Outgoing(dest, payload, mid, priority, delay or None, ttl)

    def send(
        self,
        destination: "str | Destination",
        body: Any,
        *,
        headers: dict[str, str] | None = None,
        type: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        ttl: float | None = None,
        id: str | None = None,
    ) -> str:
        """Send one message; return its id. Options the backend cannot honour raise UnsupportedError."""
        conn = self._conn
        fast = self._fast.get(destination) if destination.__class__ is str else None  # type: ignore[call-overload]
        if (fast is not None and headers is None and priority is None and not delay and ttl is None and id is None
                and conn._active == fast[3] and (fmt := fast[4].get(type)) is not None
                and not isinstance(body, _BINARY)):
            # The driver's own send (Backend.fast_publisher), learnt by _learn below after a
            # plain send to this queue passed every check: one format writes the driver's frame
            # prefix and the envelope at once, and no per-message call chain runs (ZeroMQ:
            # 29.6k -> 23.8k instructions per send, bench_zeromq.py --callgrind; raw pyzmq 4.9k).
            # A closed producer has no fast paths (close() drops them); a closed connection
            # reset its endpoints, so the backend check below fails.
            mid, when = wire()
            try:
                frame = fmt % (mid.encode(), when, _encode_body(body))
            except (TypeError, ValueError, OverflowError) as exc:
                raise body_error(exc) from None
            if len(frame) <= fast[6]:  # else: the path below refuses it (MessageTooLarge)
                ep = fast[1]
                lock = ep.lock
                try:
                    lock.acquire()  # not `with`: its special-method lookups cost as much as a send
                    try:
                        if ep.backend is fast[2]:
                            fast[5](frame)
                            return mid
                    finally:
                        lock.release()
                except Exception as exc:
                    conn._fast_failed(ep, fast[2].fast_error(exc), fast[0], frame[fast[7]:], mid)
                    return mid
        if self._closed or conn._closed:
            self._check()
        if headers or ttl is not None or id is not None or isinstance(body, _BINARY):
            out = self.build(destination, body, headers=headers, type=type, priority=priority, delay=delay, ttl=ttl,
                             id=id)
            conn.publish_one(out.destination, out.payload, out.message_id, out.priority, out.delay, out.ttl)
            return out.message_id
        # The common case, kept short: it runs right after the previous send's round trip,
        # when this VM's caches are cold and each step costs ~5x (see _ids.py). It writes
        # the same bytes as build() (tests/test_envelope.py).
        dest: Destination | None
        if destination.__class__ is str:
            dest = _queue_cache.get(destination)  # type: ignore[call-overload]
        else:  # a Topic whose name was checked before (no regex per send)
            dest = destination if destination.__class__ is Topic and destination.name in _topic_names else None  # type: ignore[union-attr,assignment]
        if dest is None:
            dest = as_destination(destination)
        if priority is not None or delay is not None:
            _check_options(priority, delay, None)
        fmt = self._formats.get(type)
        if fmt is None:
            fmt = self._format(type)
        mid, now = stamp()
        try:
            payload = fmt % (mid.encode(), now.encode(), _encode_body(body))
        except (TypeError, ValueError, OverflowError) as exc:
            raise body_error(exc) from None
        conn.publish_one(dest, payload, mid, priority, delay or None)
        if priority is None and not delay and destination.__class__ is str and (
                fast is None or fast[2] is not conn.endpoints[conn._active].backend or fast[5] and type not in fast[4]):
            self._learn(dest, type, fmt)
        return mid

    def send_nowait(self, destination: "str | Destination", body: Any, type: str | None = None) -> str | None:
        """:meth:`send` of a plain message to a queue, if the driver takes it without waiting
        (:meth:`Backend.nowait_publisher`, on send()'s fast path once a send there learnt it);
        ``None``: nothing was sent, call :meth:`send`. The asyncio twin calls it on its loop."""
        fast = self._fast.get(destination) if destination.__class__ is str else None  # type: ignore[call-overload]
        conn = self._conn
        if (fast is None or fast[5] is None or fast[1].backend is not fast[2] or type not in fast[4]
                or conn._active != fast[3] or self._closed or conn._closed or isinstance(body, _BINARY)):
            return None
        nowait = self._nowait.get(fast[0].name)
        if nowait is None or nowait[0] is not fast[2]:
            nowait = self._nowait[fast[0].name] = (fast[2], fast[2].nowait_publisher(fast[0]))
        if nowait[1] is None:
            return None
        mid, now = stamp()
        try:
            frame = fast[4][type] % (mid.encode(), now.encode(), _encode_body(body))
        except (TypeError, ValueError, OverflowError) as exc:
            raise body_error(exc) from None
        ep = fast[1]
        if len(frame) > fast[6] or not ep.lock.acquire(False):  # too large (send() refuses it), or busy
            return None
        try:
            if ep.backend is not fast[2] or not nowait[1](frame):
                return None
        except Exception:  # nothing was sent (Backend.nowait_publisher): send() meets it again and maps it
            return None
        finally:
            ep.lock.release()
        return mid

    def _learn(self, dest: Destination, type: str | None, fmt: bytes) -> None:
        """Remember the driver's fast path to queue ``dest`` after a plain send there succeeded
        (the checks it passed hold until the backend is replaced); a ``None`` is kept too."""
        conn = self._conn
        ep = conn.endpoints[conn._active]
        backend = ep.backend
        if backend is None or (len(self._fast) >= 1000 and dest.name not in self._fast):
            return
        old = self._fast.get(dest.name)
        if old is None or old[2] is not backend:
            got = backend.fast_publisher(dest)
            prefix, send = got if got is not None else (b"", None)
            old = (dest, ep, backend, conn._active, {}, send, conn.size_limit(ep)[0] + len(prefix), len(prefix),
                   prefix.replace(b"%", b"%%"))
            self._fast[dest.name] = old
        if old[5] is not None and len(old[4]) < 100:
            old[4][type] = old[8] + fmt

    def _build_plain(self, destination: "str | Destination", body: Any) -> Outgoing:
        """:meth:`build` without options: send()'s format path where it applies (same bytes)."""
        dest = _queue_cache.get(destination) if destination.__class__ is str else None  # type: ignore[call-overload]
        if dest is None or isinstance(body, _BINARY):
            return self.build(destination, body)
        fmt = self._formats.get(None) or self._format(None)
        mid, now = stamp()
        try:
            payload = fmt % (mid.encode(), now.encode(), _encode_body(body))
        except (TypeError, ValueError, OverflowError) as exc:
            raise body_error(exc) from None
        if len(payload) > self._conn.max_message_size:  # what build()'s encode() refuses
            return self.build(destination, body)
        return Outgoing(dest, payload, mid)

    def _format(self, type: str | None) -> bytes:
        _check_type(type)
        fmt = fresh_format(self._conn.source, type or DEFAULT_TYPE)
        if len(self._formats) < 1000:
            self._formats[type] = fmt
        return fmt

    def send_many(self, messages: Iterable[Outgoing | tuple[Any, Any]]) -> list[str]:
        """Send a batch (``Outgoing`` from :meth:`build`, or ``(destination, body)`` pairs).

        Returns when the broker has confirmed every message of the batch.
        """
        self._check()
        items = [m if isinstance(m, Outgoing) else self._build_plain(m[0], m[1]) for m in messages]
        if items:
            self._conn.publish(items)
        return [m.message_id for m in items]

    def _check(self) -> None:
        if self._closed:
            raise StateError("the producer is closed")
        self._conn._check()

    def close(self) -> None:
        self._closed = True
        self._fast = {}  # send()'s fast path checks no closed flag

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Connection", "Consumer", "Producer", "as_destination", "default_url", "is_pattern"]
