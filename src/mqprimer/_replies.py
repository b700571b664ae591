"""Request/reply: one reply path per connection, shared by every thread (docs/request-reply.md).

The path is made on the first :meth:`~mqprimer.Connection.request`, on a backend instance
of its own (an :class:`~mqprimer._endpoint.Endpoint` that serves nothing else), and
removed when the connection closes. Replies are matched to waiting callers by their
envelopes' ``mqcorrelationid``. There is no reader thread: a waiting caller that finds the
path free reads it for everyone (handing each reply to its caller), the others wait on a
condition; so a lone caller reads its own reply with no thread hop.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

from ._endpoint import Endpoint
from ._ids import stamp
from ._sub import _Sub
from .backend import NATIVE, Capabilities, Delivery, Destination, Queue, ReplyPath
from .consumer import ERROR_TYPE
from .destinations import as_destination
from .envelope import DEFAULT_TYPE, Envelope, decode, encode, make
from .errors import ConnectionFailed, EnvelopeError, RemoteError, Timeout
from .message import Message, _State
from .url import URL


class Owner(Protocol):
    """What the reply path uses of its :class:`~mqprimer.Connection` (which imports this module)."""

    _active: int
    source: str
    max_message_size: int

    @property
    def urls(self) -> Sequence[URL]: ...

    @property
    def endpoints(self) -> Sequence[Endpoint]: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def publish_one(self, dest: Destination, payload: bytes, message_id: str, priority: int | None = None,
                    delay: float | None = None, ttl: float | None = None) -> None: ...

class Caller(Owner, Protocol):
    """What :func:`request` uses of its :class:`~mqprimer.Connection`."""

    _replies: "Replies | None"
    _replies_lock: threading.Lock

    def _check(self) -> None: ...


log = logging.getLogger("mqprimer")

_SLICE = 0.05  # longest one caller reads the path at a time (same-channel paths publish between reads)
_SHORT = 0.002  # the slice while other callers' requests may be waiting in the outbox
_REMEMBER = 4096  # answered correlation ids kept, to tell a duplicate reply from a late one
_local = threading.local()


def check_headers(headers: dict[str, str] | None) -> None:
    if headers:
        for k, v in headers.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("headers must map str to str")


def check_type(type: str | None) -> None:
    if type is not None and (not isinstance(type, str) or not type):
        raise ValueError(f"type must be a non-empty string, got {type!r}")


def request(conn: Caller, destination: str, body: Any, timeout: float, headers: dict[str, str] | None,
            type: str | None) -> Message:
    """:meth:`mqprimer.Connection.request`: its arguments checked, then the connection's
    :class:`Replies` (made by the first call) sends the request and waits."""
    replies = conn._replies
    dest = None if replies is None else replies.known(destination, timeout, headers, type)
    if dest is None or replies is None:
        dest = checked(conn, destination, timeout, headers, type)
        if replies is None:
            replies = _made(conn)
        replies.learn(destination, dest)
    return replies.request(dest, body, float(timeout), headers, type)


def _made(conn: Caller) -> "Replies":
    """The connection's Replies, made by the first request."""
    with conn._replies_lock:
        conn._check()
        if conn._replies is None:
            conn._replies = Replies(conn)
        return conn._replies


def checked(conn: Owner, destination: str, timeout: float, headers: dict[str, str] | None,
            type: str | None) -> Queue:
    """The queue a request goes to, once the request's arguments are checked."""
    conn.capabilities.require("request_reply", "request/reply (conn.request)")
    dest = as_destination(destination)
    if not isinstance(dest, Queue):
        raise ValueError("request() sends to a queue (a str), not a Topic: exactly one service must answer")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e9:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    check_headers(headers)
    check_type(type)
    return dest


def dropped_counts(replies: "Replies | None") -> dict[str, int]:
    """The replies a connection dropped so far (:attr:`mqprimer.Connection.dropped_replies`)."""
    return dict(replies.dropped) if replies is not None else {"duplicate": 0, "late": 0, "invalid": 0}


class Wakes(Protocol):
    """A waiting caller's wake-up: a threading.Event, or the asyncio twin's (aio/_request.py)."""

    def set(self) -> None: ...


class _Slot:
    __slots__ = ("payload", "env", "event", "turn")

    def __init__(self) -> None:
        self.payload: bytes | None = None
        self.env: Envelope | None = None
        # made only by a caller that has to wait (a lone caller reads its own reply): set when
        # the reply is in, or when it is this caller's turn to read
        self.event: Wakes | None = None
        self.turn = False  # it is this caller's turn to read (set with self.cond held)


class _Settled:
    """The settler of a reply message: replies are settled when read; settling again is refused."""

    retry_policy: Any = None

    def _settle_ack(self, m: Message) -> None: ...

    def _settle_retry(self, m: Message, delay: float, error: str | None) -> None: ...

    def _settle_dead(self, m: Message, reason: str) -> None: ...

    def _touch(self, m: Message) -> None: ...

    def _reply(self, m: Message, body: Any, headers: dict[str, str] | None, type: str | None,
               error: str | None) -> None: ...


_SETTLED = _Settled()


class Replies:
    """The reply path of one connection and the callers waiting on it."""

    def __init__(self, conn: Owner) -> None:
        self.conn = conn
        # its own backend instance (read by one thread at a time, apart from the producers'),
        # on the connection's own broker connection where the backend can share it
        self.ep = Endpoint(conn.urls[conn._active], parent=conn.endpoints[conn._active])
        self.lock = threading.Lock()  # holds the path (a driver is used by one thread at a time)
        self.cond = threading.Lock()  # guards waiting, answered and the counters
        self.waiting: dict[str, _Slot] = {}
        self.answered: deque[str] = deque(maxlen=_REMEMBER)
        self.answered_set: set[str] = set()
        self.path: ReplyPath | None = None
        self.reply_sub: _Sub | None = None  # what reply messages name as their subscription
        # requests for a path that publishes them, waiting for whoever holds it (the reader)
        self.outbox: deque[tuple[Queue, bytes, str, float | None]] = deque()
        self.generation = 0
        #: replies dropped: a second reply to one request, one after its caller gave up, not an envelope
        self.dropped = {"duplicate": 0, "late": 0, "invalid": 0}
        self.queues: dict[str, Queue] = {}  # destinations whose requests passed checked()
        self.ttl = conn.capabilities.ttl  # how requests expire (a connection's capabilities stay)

    def known(self, destination: str, timeout: float, headers: dict[str, str] | None,
              type: str | None) -> Queue | None:
        """The queue of a plain request to a destination that passed :func:`checked` before
        (such a request needs no other check); ``None``: check it."""
        if (headers is None and type is None and (timeout.__class__ is float or timeout.__class__ is int)
                and 0 < timeout < 1e9):
            return self.queues.get(destination)
        return None

    def learn(self, destination: str, dest: Queue) -> None:
        if len(self.queues) < 1000:
            self.queues[destination] = dest

    # -- the path ---------------------------------------------------------------------
    def _path(self) -> ReplyPath:
        if self.path is None:
            name = f"mqreply.{uuid.uuid4().hex[:16]}"
            self.path = self.ep.call("open reply path", lambda b: b.reply_path(name))
            self.reply_sub = _Sub(self.ep, Queue(name))
            self.generation += 1
        return self.path

    def _lost(self, exc: BaseException, what: str) -> BaseException:
        err = self.ep.translate(exc, what)
        if isinstance(err, ConnectionFailed):
            self.path = None
            self.ep.reset()
        return err

    def close(self) -> None:
        with self.lock:
            path, self.path = self.path, None
            if path is not None:
                try:
                    with self.ep.lock:
                        path.close()
                except Exception as exc:
                    log.debug("closing the reply path on %s: %s", self.ep.url, self.ep.scrub(str(exc)))
            self.ep.reset()

    # -- one request ------------------------------------------------------------------
    def request(self, dest: Queue, body: Any, timeout: float, headers: dict[str, str] | None,
                type: str | None) -> Message:
        conn = self.conn
        mid, now = stamp()
        slot = self.enter(mid)
        deadline = time.monotonic() + timeout
        try:
            path = self.path
            if path is None:
                with self.lock:
                    path = self._path()
            payload, ttl = self.payload(path, mid, now, body, timeout, headers, type)
            if path.concurrent_requests:
                try:
                    path.request(dest, payload, message_id=mid, ttl=ttl if self.ttl is NATIVE else None)
                except Exception as exc:
                    with self.lock:
                        raise self._lost(exc, "request") from None
            elif path.publishes_requests:
                self.outbox.append((dest, payload, mid, ttl if self.ttl is NATIVE else None))
                if self.lock.acquire(blocking=False):
                    try:
                        self._send_outbox()
                    finally:
                        self.lock.release()
                # else the path is held (read): its holder sends the request within _SHORT
            else:
                conn.publish_one(dest, payload, mid, None, None, ttl)
            self._wait(slot, deadline, timeout, dest)
        finally:
            self.leave(mid, slot)
        return self.reply(slot)

    # the steps of a request, shared with the asyncio twin's (aio/_request.py)
    def enter(self, mid: str) -> _Slot:
        """A new caller waits for the reply to request ``mid``."""
        slot = _Slot()
        with self.cond:
            self.waiting[mid] = slot
        return slot

    def payload(self, path: ReplyPath, mid: str, now: str, body: Any, timeout: float,
                headers: dict[str, str] | None, type: str | None) -> tuple[bytes, float | None]:
        """The request's envelope, encoded, and its ttl (``None``: the backend has none)."""
        conn = self.conn
        ttl = timeout if self.ttl else None
        env = make(
            id=mid, source=conn.source, type=type or DEFAULT_TYPE, body=body, time=now, headers=headers,
            expires=int(time.time() * 1000 + timeout * 1000) if ttl else None, reply_to=path.address,
        )
        return encode(env, max_size=conn.max_message_size), ttl

    def leave(self, mid: str, slot: _Slot) -> None:
        """The caller of request ``mid`` stops waiting (answered, timed out or failed)."""
        with self.cond:
            del self.waiting[mid]
            if slot.env is not None:  # remembered, to tell a duplicate reply from a late one
                self.answered.append(mid)
                # the set keeps the last _REMEMBER ids and up to as many older ones: made
                # again from the deque once in _REMEMBER requests, not (as the deque is
                # full from then on) on every one
                if len(self.answered_set) >= 2 * _REMEMBER:
                    self.answered_set = set(self.answered)
                self.answered_set.add(mid)

    def reply(self, slot: _Slot) -> Message:
        """The reply message of an answered slot (raises RemoteError for an error reply)."""
        assert slot.env is not None and slot.payload is not None
        return self._message(slot.env, slot.payload)

    def _send_outbox(self) -> None:
        """Publish the queued requests (caller holds ``self.lock``)."""
        path = self.path
        if path is None:
            path = self._path()
        try:
            with self.ep.lock:
                while self.outbox:
                    dest, payload, mid, ttl = self.outbox.popleft()
                    path.request(dest, payload, message_id=mid, ttl=ttl)
        except Exception as exc:
            raise self._lost(exc, "request") from None

    def _wait(self, slot: _Slot, deadline: float, timeout: float, dest: Queue) -> None:
        while slot.env is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"no reply from {dest.name} within {timeout:g}s")
            if self.lock.acquire(blocking=False):
                try:
                    if slot.env is None:
                        if self.outbox:
                            self._send_outbox()
                        # others' requests may queue up meanwhile: read in short slices then
                        short = len(self.waiting) > 1 and self._queues()
                        self._read(min(left, _SHORT if short else _SLICE))
                finally:
                    self.lock.release()
                if slot.env is not None and len(self.waiting) > 1:
                    self._hand_over(slot)
            else:
                self._sleep(slot, min(left, _SLICE))

    def _sleep(self, slot: _Slot, timeout: float) -> None:
        """Wait until the reply is in, it is this caller's turn to read, or ``timeout``."""
        with self.cond:
            if slot.env is not None or slot.turn:
                slot.turn = False
                return
            # one per thread, reused: a thread waits for one request at a time, and a stale
            # set() only ends one wait early (env and turn say what really happened)
            event: threading.Event | None = getattr(_local, "event", None)
            if event is None:
                event = _local.event = threading.Event()
            slot.event = event
        event.wait(timeout)
        event.clear()  # a set() racing this is not lost: env or turn says it on the next call

    def _queues(self) -> bool:
        path = self.path
        return path is not None and path.publishes_requests and not path.concurrent_requests

    def _hand_over(self, leaving: _Slot) -> None:
        """The reader got its reply and goes: wake one caller still waiting, to read next."""
        with self.cond:
            for s in self.waiting.values():
                if s is not leaving and s.env is None:
                    s.turn = True
                    if s.event is not None:
                        s.event.set()
                    return

    def _read(self, timeout: float) -> None:
        """Read replies (caller holds ``self.lock``) and hand each to its caller."""
        path = self.path
        if path is None:  # lost meanwhile: make a new one; replies sent to the old one are lost
            path = self._path()
        try:
            with self.ep.lock:
                payload = path.receive(timeout)
                while payload is not None:
                    self._deliver(payload)
                    # drain for the others only: a lone caller's extra poll is a broker round
                    # trip on some paths (beanstalkd's reserve-with-timeout 0)
                    payload = path.receive(0) if len(self.waiting) > 1 else None
        except Exception as exc:
            raise self._lost(exc, "receive reply") from None

    def _deliver(self, payload: bytes) -> None:
        try:
            env = decode(payload, max(self.conn.max_message_size, len(payload)))
        except EnvelopeError as exc:
            self._drop("invalid", "?", str(exc))
            return
        corr = env.correlation_id or ""
        with self.cond:
            slot = self.waiting.get(corr)
            if slot is None or slot.env is not None:
                # a second reply (a handler that ran twice), or one whose caller gave up
                dup = slot is not None or corr in self.answered_set
                self._drop("duplicate" if dup else "late", corr, "")
                return
            slot.env, slot.payload = env, payload
            if slot.event is not None:
                slot.event.set()

    def _drop(self, why: str, corr: str, detail: str) -> None:
        self.dropped[why] += 1
        log.debug("reply dropped (%s) for request %s%s", why, corr, f": {detail}" if detail else "")

    def _message(self, env: Envelope, payload: bytes) -> Message:
        sub = self.reply_sub or _Sub(self.ep, Queue("mqreply"))
        m = Message(_SETTLED, sub, Delivery(payload), env, 0)
        m._mark(_State.ACKED)
        if env.type == ERROR_TYPE:
            raise RemoteError(env.reason or "the service failed the request (no reason given)", m)
        return m
