"""The asyncio twin's calls on a driver's own asyncio I/O (backend.py's asyncio SPI).

Where a driver overrides ``Subscription.receive_async`` / ``ack_async`` or
``Backend.publish_async`` (beanstalk), the twin's receive, ack and plain send run on the
event loop's non-blocking sockets instead of a thread: a thread hop (~50 us here) is half a
beanstalkd round trip, which no thread path can hide (docs/asyncio.md). These functions do
what :meth:`mqprimer.Consumer.receive` (its one-subscription path and ``_wrap``, through
:func:`._nowait.take`), :meth:`mqprimer.Message.ack` (``_settle``) and
:meth:`mqprimer.Producer.send` (its common path) do, with every lock taken without waiting;
whenever they cannot (busy, not the common case, a driver error) they say so and the caller
takes the blocking path on a thread, which handles everything uncommon as usual.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from .._ids import stamp
from ..backend import Backend, NotNow, Subscription
from ..consumer import Consumer
from ..destinations import _queue_cache
from ..envelope import body_error
from ..message import Message, _State
from ..producer import _BINARY, Producer, _encode_body
from . import _nowait

_offers: dict[tuple[type, str], bool] = {}
_receiving: dict[type, bool] = {}  # offers(sub, "receive_async") by class
_acking: dict[type, bool] = {}  # offers(sub, "ack_async") by class


def offers(obj: Subscription | Backend, name: str) -> bool:
    """Whether ``obj``'s class overrides the asyncio SPI method ``name`` (checked once per class)."""
    key = (obj.__class__, name)
    got = _offers.get(key)
    if got is None:
        base = Subscription if isinstance(obj, Subscription) else Backend
        got = _offers[key] = getattr(obj.__class__, name) is not getattr(base, name)
        if name == "receive_async":
            _receiving[obj.__class__] = got
        elif name == "ack_async":
            _acking[obj.__class__] = got
    return got


def receives(c: Consumer) -> bool:
    """Whether ``c`` has one subscription, on a driver with an awaitable receive."""
    s = c._single
    if s is None or s.sub is None:
        return False
    got = _receiving.get(s.sub.__class__)  # offers(), one Python call fewer on every receive
    return offers(s.sub, "receive_async") if got is None else got


async def receive(c: Consumer, timeout: float) -> "Message | _nowait.Raw | None":
    """Up to ``timeout`` seconds of :meth:`mqprimer.Consumer.receive` on the loop; a
    :data:`._nowait.Raw` delivery: finish it with :func:`._nowait.wrap` on a thread.
    Raises :class:`NotNow`: nothing taken, receive on a thread."""
    s = c._single
    if s is None or c._closed:
        raise NotNow("not a single subscription, or closed")
    sub = s.sub
    if sub is None or not (_receiving.get(sub.__class__) or offers(sub, "receive_async")):
        raise NotNow("not connected, or not offered")
    lock = s.lock
    if not lock.acquire(False):
        raise NotNow("busy")
    try:
        if s.sub is not sub:
            raise NotNow("resubscribed")
        try:
            d = await sub.receive_async(timeout)
        except (NotNow, asyncio.CancelledError):
            raise
        except Exception as exc:  # the thread's receive meets it and handles it (reconnects)
            raise NotNow(f"driver error: {type(exc).__name__}") from exc
        if d is None:
            return None
        return _nowait.take(c, s, sub, d)
    finally:
        lock.release()


async def ack(m: Message) -> bool:
    """``m.ack()`` on the loop; ``False``: nothing done, call ``m.ack()`` on a thread.

    Cancelled while the delete is out, the message counts as acked: the driver finishes the
    command (or drops the connection, and the broker redelivers it: at least once)."""
    if m._state is not _State.PENDING:
        return False  # the thread's ack raises the StateError
    s = m._sub
    sub = s.sub
    if sub is None or not (_acking.get(sub.__class__) or offers(sub, "ack_async")) or not s.lock.acquire(False):
        return False
    try:
        if s.sub is not sub or m._generation != s.generation:
            return False  # lost with its connection: the portable layer says so
        m._state = _State.ACKED  # as Message.ack: a second ack meanwhile is refused
        try:
            await sub.ack_async(m._delivery)
        except asyncio.CancelledError:
            m._consumer._pending.discard(m)  # type: ignore[attr-defined]
            raise
        except Exception:  # NotNow, or a driver error the thread's ack meets and handles
            m._state = _State.PENDING
            return False
        m._consumer._pending.discard(m)  # type: ignore[attr-defined]
        return True
    finally:
        s.lock.release()


def sends(p: Producer) -> bool:
    """Whether the active endpoint's driver has an awaitable plain publish."""
    conn: Any = p._conn
    backend = conn.endpoints[conn._active].backend
    return backend is not None and offers(backend, "publish_async")


async def send(p: Producer, destination: Any, body: Any, type: str | None) -> "str | tuple[Any, ...] | None":
    """:meth:`mqprimer.Producer.send` of a plain message to a queue, on the loop.

    The message id once sent; ``None``: nothing sent, call ``send`` on a thread (the first
    send to a queue there makes the checks this path relies on); a tuple: the driver failed
    after the message may have gone out: ``conn._fast_failed(*it)`` on a thread maps the
    error and sends the same message again after reconnecting, as ``publish_one`` does."""
    conn: Any = p._conn
    if p._closed or conn._closed or destination.__class__ is not str or isinstance(body, _BINARY):
        return None
    dest = _queue_cache.get(destination)
    fmt = p._formats.get(type)
    ep = conn.endpoints[conn._active]
    backend = ep.backend
    fast = conn._fast  # publish_one's: set once a plain send to this backend passed every check
    if (dest is None or fmt is None or backend is None or fast is None or fast[0] is not backend
            or dest.__class__ not in fast[2] or not offers(backend, "publish_async")):
        return None
    mid, now = stamp()
    try:
        payload = fmt % (mid.encode(), now.encode(), _encode_body(body))
    except (TypeError, ValueError, OverflowError) as exc:
        raise body_error(exc) from None
    if len(payload) > fast[1]:
        return None  # too large: send() refuses it
    # one send at a time on the loop per connection; the others wait their turn on the loop
    # (FIFO), not on a thread that would wait for the endpoint's lock held by the loop
    gate = _gate(conn)
    async with gate:
        if not ep.lock.acquire(False):
            return None  # a thread's call holds the connection
        try:
            if ep.backend is not backend:
                return None
            try:
                await backend.publish_async(dest, payload, message_id=mid)
            except NotNow:
                return None
            except Exception as exc:
                return (ep, exc, dest, payload, mid)
        finally:
            ep.lock.release()
    return mid


_gates: "weakref.WeakKeyDictionary[Any, tuple[asyncio.AbstractEventLoop, asyncio.Lock]]" = weakref.WeakKeyDictionary()


def _gate(conn: Any) -> asyncio.Lock:
    """The asyncio lock of ``conn``'s loop-side sends on the running loop."""
    loop = asyncio.get_running_loop()
    got = _gates.get(conn)
    if got is None or got[0] is not loop:
        got = _gates[conn] = (loop, asyncio.Lock())
    return got[1]
