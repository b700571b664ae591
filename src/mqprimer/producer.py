"""Producers: :meth:`Producer.send` (with its learnt per-queue fast path), ``build`` and
``send_many``. A :class:`~mqprimer.Connection` makes them and publishes for them (failover,
reconnect, capability and size checks live there)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import msgspec

from ._endpoint import Endpoint
from ._ids import _HEX3, _HEX3B, Frames, _counter, stamp
from ._replies import check_headers
from ._replies import check_type as _check_type
from .backend import Destination, Outgoing, Topic
from .destinations import _queue_cache, _topic_names, as_destination
from .envelope import DEFAULT_TYPE, body_error, encode, fresh_format, make
from .errors import ConnectionFailed, StateError

_BINARY = (bytes, bytearray, memoryview)
# bodies send()'s fast path takes (exact classes: a set lookup, cheaper than isinstance);
# anything else, bytes-like ones included, takes the usual path, which writes the same bytes
_JSON_CLASSES = frozenset({dict, list, str, int, float, bool, type(None), tuple})
_encode_body = msgspec.json.Encoder().encode
_time_ns = time.time_ns


class _Conn(Protocol):
    """What a producer uses of its :class:`~mqprimer.Connection` (which imports this module)."""

    source: str
    max_message_size: int
    endpoints: list[Endpoint]
    _active: int
    _closed: bool

    def size_limit(self, ep: Endpoint) -> tuple[int, str]: ...

    def publish(self, items: Sequence[Outgoing]) -> None: ...

    def publish_one(self, dest: Destination, payload: bytes, message_id: str, priority: int | None = None,
                    delay: float | None = None, ttl: float | None = None) -> None: ...

    def _fast_failed(self, ep: Endpoint, exc: Exception, dest: Destination, payload: bytes, mid: str) -> None: ...

    def _check(self) -> None: ...


def _check_options(priority: int | None, delay: float | None, ttl: float | None) -> None:
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9
    ):
        raise ValueError(f"priority must be an int from 0 (lowest) to 9 (most urgent), got {priority!r}")
    if delay is not None and delay < 0:
        raise ValueError(f"delay must be >= 0 seconds, got {delay}")
    if ttl is not None and ttl <= 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl}")



class _KeywordsOnly:
    """The type of send()'s third parameter, which no caller passes.

    send()'s options are keyword-only, but a keyword-only parameter left out costs a dict
    lookup in ``__kwdefaults__`` per call (CPython 3.11), ~0.8k instructions per send for
    six of them, while defaulted positional ones are copied from a tuple. So they are
    positional in the code, behind this sentinel: any option passed positionally lands in
    ``_keywords_only`` (TypeError), a type checker refuses anything there (this class is
    private), and ``inspect.signature`` shows the keyword-only signature (set below).
    """


_KEYWORDS_ONLY = _KeywordsOnly()


class Producer:
    """Sends messages. ``send`` returns once the broker has the message (where it confirms)."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self._closed = False
        # type -> the envelope format of send()'s fast path (envelope.fresh_format)
        self._formats: dict[str | None, bytes] = {}
        # queue name -> (its Queue, endpoint, backend, endpoint index, {type: prefixed format},
        # the driver's send or None, frame size limit, prefix length, %-escaped prefix,
        # {type: its _ids.Frames}, the Frames of type None or None, the endpoint's lock): _learn
        self._fast: dict[str, tuple[Any, ...]] = {}
        self._nowait: dict[str, tuple[Any, Any]] = {}  # queue name -> (backend, its nowait_publisher)
        self._batch: dict[str, tuple[Any, Any]] = {}  # queue name -> (backend, its batch_publisher)
        self._plain: Frames | None = None  # the type-None envelope format without a driver prefix

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
        _keywords_only: "_KeywordsOnly" = _KEYWORDS_ONLY,  # see _KeywordsOnly: `*` without its cost
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
        if (fast is not None and _keywords_only is _KEYWORDS_ONLY and headers is None and priority is None
                and not delay and ttl is None and id is None and conn._active == fast[3]
                and (frames := fast[10] if type is None else fast[9].get(type)) is not None
                and body.__class__ in _JSON_CLASSES):
            # The driver's own send (Backend.fast_publisher), learnt by _learn below after a
            # plain send to this queue passed every check: one two-spec format (_ids.Frames:
            # this millisecond's id head and time already in it) writes the driver's frame
            # prefix and the envelope, and no per-message call chain runs. The id is _ids.stamp's
            # (the same counter, head and tail), inline: no call, no tuple, no encode.
            # A closed producer has no fast paths (close() drops them); a closed connection
            # reset its endpoints, so the backend check below fails.
            ms = _time_ns() // 1_000_000
            n = next(_counter)
            st = frames.st
            if st[0] != ms or st[1] != n >> 12:
                st = frames.update(ms, n >> 12)
            n &= 0xFFF
            try:
                frame = st[2] % (_HEX3B[n], _encode_body(body))
            except (TypeError, ValueError, OverflowError) as exc:
                raise body_error(exc) from None
            if len(frame) <= fast[6]:  # else: the path below refuses it (MessageTooLarge)
                mid = f"{st[3]}{_HEX3[n]}{st[4]}"
                lock = fast[11]
                try:
                    lock.acquire()  # not `with`: its special-method lookups cost as much as a send
                    try:
                        if fast[1].backend is fast[2]:
                            fast[5](frame)
                            return mid
                    finally:
                        lock.release()
                except Exception as exc:
                    conn._fast_failed(fast[1], fast[2].fast_error(exc), fast[0], frame[fast[7]:], mid)
                    return mid
        if _keywords_only is not _KEYWORDS_ONLY:
            raise TypeError("Producer.send() takes 2 positional arguments (destination, body); its options "
                            "(headers, type, priority, delay, ttl, id) are keyword-only: send(q, body, headers=...)")
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
        if (fast is None or fast[5] is None or fast[1].backend is not fast[2]
                or (frames := fast[10] if type is None else fast[9].get(type)) is None
                or conn._active != fast[3] or self._closed or conn._closed or body.__class__ not in _JSON_CLASSES):
            return None
        nowait = self._nowait.get(fast[0].name)
        if nowait is None or nowait[0] is not fast[2]:
            nowait = self._nowait[fast[0].name] = (fast[2], fast[2].nowait_publisher(fast[0]))
        if nowait[1] is None:
            return None
        # send()'s fast-path framing (_ids.Frames): the same ids and bytes
        ms = _time_ns() // 1_000_000
        n = next(_counter)
        st = frames.st
        if st[0] != ms or st[1] != n >> 12:
            st = frames.update(ms, n >> 12)
        n &= 0xFFF
        try:
            frame = st[2] % (_HEX3B[n], _encode_body(body))
        except (TypeError, ValueError, OverflowError) as exc:
            raise body_error(exc) from None
        mid = f"{st[3]}{_HEX3[n]}{st[4]}"
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
                   prefix.replace(b"%", b"%%"), {}, None, ep.lock)
            self._fast[dest.name] = old
        if old[5] is not None and len(old[4]) < 100:
            old[4][type] = old[8] + fmt
            frames = old[9][type] = Frames(old[4][type])
            if type is None:
                self._fast[dest.name] = (*old[:10], frames, old[11])

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

        Returns when the broker has confirmed every message of the batch. A list of plain
        ``(queue, body)`` pairs to one queue already sent to goes through the driver's batch
        path where it has one (ZeroMQ: many envelopes per frame; each is still its own message).
        """
        self._check()
        if messages.__class__ is list and len(messages) > 1:  # type: ignore[attr-defined]
            ids = self._send_batch(messages)  # type: ignore[arg-type]
            if ids is not None:
                return ids
        items = [m if isinstance(m, Outgoing) else self._build_plain(m[0], m[1]) for m in messages]
        if items:
            self._conn.publish(items)
            first = messages[0] if messages.__class__ is list else None  # type: ignore[index]
            if first.__class__ is tuple and first[0].__class__ is str and first[0] not in self._fast:  # type: ignore[index]
                # the checks send() passes before it learns its fast path passed here too: the
                # next send_many (or send) to this queue takes it
                self._learn(items[0].destination, None, self._formats.get(None) or self._format(None))
        return [m.message_id for m in items]

    def _send_batch(self, messages: list[Any]) -> list[str] | None:
        """send_many of plain ``(queue, body)`` pairs, all to one queue whose send() fast path
        is learnt, through the driver's :meth:`Backend.batch_publisher` (ZeroMQ: many
        envelopes per frame); ``None``: nothing was sent, take the usual path. Each envelope
        is send()'s fast-path one (the same ids, time and bytes), made without a driver prefix."""
        first = messages[0]
        if first.__class__ is not tuple or len(first) != 2:
            return None
        name = first[0]
        fast = self._fast.get(name) if name.__class__ is str else None
        conn = self._conn
        if fast is None or fast[5] is None or conn._active != fast[3] or fast[1].backend is not fast[2]:
            return None
        batch = self._batch.get(name)
        if batch is None or batch[0] is not fast[2]:
            batch = self._batch[name] = (fast[2], fast[2].batch_publisher(fast[0]))
        if batch[1] is None:
            return None
        frames = self._plain
        if frames is None:
            frames = self._plain = Frames(self._formats.get(None) or self._format(None))
        limit = fast[6] - fast[7]  # send()'s size limit, without the driver's prefix
        payloads: list[bytes] = []
        ids: list[str] = []
        add, add_id, classes, encode_body = payloads.append, ids.append, _JSON_CLASSES, _encode_body
        hex3, hex3b = _HEX3, _HEX3B
        ms = _time_ns() // 1_000_000
        st = frames.st
        for m in messages:
            if m.__class__ is not tuple or len(m) != 2 or m[0] != name or m[1].__class__ not in classes:
                return None
            n = next(_counter)
            if st[0] != ms or st[1] != n >> 12:
                st = frames.update(ms, n >> 12)
            n &= 0xFFF
            try:
                payload = st[2] % (hex3b[n], encode_body(m[1]))
            except (TypeError, ValueError, OverflowError) as exc:
                raise body_error(exc) from None
            if len(payload) > limit:
                return None  # the usual path refuses it (MessageTooLarge)
            add(payload)
            add_id(f"{st[3]}{hex3[n]}{st[4]}")
        ep, lock = fast[1], fast[11]
        try:
            with lock:
                if ep.backend is not fast[2]:
                    return None
                batch[1](payloads)
        except Exception as exc:
            err = ep.translate(fast[2].fast_error(exc), "publish")
            if isinstance(err, ConnectionFailed):
                ep.reset()
            raise err from None
        return ids

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


def _public_signature(fn: Any) -> inspect.Signature:
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "_keywords_only"]
    return sig.replace(parameters=[p if i < 3 else p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                   for i, p in enumerate(params)])


Producer.send.__signature__ = _public_signature(Producer.send)  # type: ignore[attr-defined]
