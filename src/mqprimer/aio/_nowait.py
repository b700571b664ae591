"""The asyncio twin's calls that run on the event loop itself, where the driver says they never wait.

A thread hop costs two OS wake-ups (~20-60 us on this machine under load): ten times a
ZeroMQ or AMQP receive + ack, whose deliveries already sit in this process. Where a
backend declares an operation in ``Capabilities.nowait`` (backend.py: it neither does
I/O that can wait nor takes a lock another thread holds across I/O, and when it raises it
has done nothing), the twin runs it here, on the loop, and takes the thread path whenever
that is not possible at once: the subscription's lock is held (a receive slice or a settle
is under way on the consumer's thread), the message needs more than the common path
(an envelope to dead-letter, an expired message: both may publish), or the driver raised
(the thread repeats the call and the portable layer handles the error there).

These functions do what :meth:`mqprimer.Consumer.receive` (its one-subscription fast path
and ``_wrap``) and :meth:`mqprimer.Message.ack` (``_settle``) do on their common path,
with the lock taken without waiting; every other path stays the portable layer's.
"""

from __future__ import annotations

import time

from .._sub import _Sub
from ..backend import Delivery, Subscription
from ..consumer import Consumer
from ..envelope import UNSET, _decoder, validate
from ..message import Message, _State

#: a delivery taken on the loop that needs the portable layer's slow path (on a thread)
Raw = tuple[_Sub, Subscription, Delivery]
#: the largest payload decoded on the loop: decoding JSON costs ~10 ms a MiB here, and a CI run
#: saw a broker-size-limit message held the loop 0.77 s; bigger ones are decoded on a thread
INLINE_MAX = 64 * 1024


def polls(c: Consumer) -> bool:
    """Whether ``c`` has one subscription, on a backend whose ``receive(0.0)`` never waits."""
    s = c._single
    return s is not None and "poll" in s.ep.capabilities.nowait


def poll(c: Consumer) -> "Message | Raw | None":
    """A message this process already holds for ``c``, taken without waiting; ``None``: none
    at hand (or not declared, or busy); a :data:`Raw` delivery: finish it with :func:`wrap`."""
    s = c._single
    if s is None or c._closed or "poll" not in s.ep.capabilities.nowait or not s.lock.acquire(False):
        return None
    try:
        sub = s.sub
        if sub is None:
            return None
        try:
            d = sub.receive_nowait()
        except Exception:  # it has done nothing (nowait): the thread's receive meets it and handles it
            return None
        if d is None:
            return None
        return take(c, s, sub, d)
    finally:
        s.lock.release()


def take(c: Consumer, s: _Sub, sub: Subscription, d: Delivery) -> "Message | Raw":
    """The message of delivery ``d`` taken on the loop (``s.lock`` held), as Consumer._wrap's
    common path makes it; a :data:`Raw` delivery where it needs the slow path (on a thread)."""
    if True:
        if len(d.payload) > INLINE_MAX:
            return s, sub, d
        try:
            env = _decoder.decode(d.payload)
            if env.headers_json is not None or env.data_base64 is not UNSET:
                validate(env)  # CPU only, as in Consumer._wrap
        except Exception:
            return s, sub, d  # not a valid envelope (or not this schema's): the thread dead-letters or decodes it
        if env.expires is not None and env.expires <= time.time() * 1000:
            return s, sub, d  # expired: Consumer._wrap acks and drops it
        if d.extra_attempts:
            env.attempt += d.extra_attempts
        m = Message(c, s, d, env, s.generation)
        c._pending.add(m)
        return m


def wrap(c: Consumer, raw: Raw) -> Message | None:
    """On a thread: what :meth:`mqprimer.Consumer.receive` does with a delivery after taking it."""
    s, sub, d = raw
    with s.lock:
        if s.sub is not sub:  # its connection was lost meanwhile: the broker delivers it again
            return None
        return c._wrap(s, sub, d)


def ack(m: Message) -> bool:
    """``m.ack()`` on the loop; ``False``: not done, call ``m.ack()`` on a thread."""
    if m._state is not _State.PENDING:
        return False  # the thread's ack raises the StateError
    s = m._sub
    if "ack" not in s.ep.capabilities.nowait or not s.lock.acquire(False):
        return False
    try:
        sub = s.sub
        if sub is None or m._generation != s.generation:
            return False  # lost with its connection: the portable layer says so
        try:
            if not sub.ack_nowait(m._delivery):
                return False  # it would wait (a lock another process holds): the thread acks
        except Exception:  # it has done nothing (nowait): the thread's ack meets it and handles it
            return False
        m._state = _State.ACKED
        m._consumer._pending.discard(m)  # type: ignore[attr-defined]
        return True
    finally:
        s.lock.release()
