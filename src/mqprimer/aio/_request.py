"""The asyncio twin's request on its event loop, where the reply path can be watched by it.

Where the connection's reply path offers :meth:`~mqprimer.backend.ReplyPath.loop_fd`
(ZeroMQ), ``await conn.request()`` makes and sends its request on the loop, and while
any request of this loop waits, the loop watches the path's file descriptor and hands
each reply that comes in to its coroutine: no task, no timer per request. Many requests
in flight then cost one thread, as a raw DEALER with many outstanding does, instead of a
thread each woken per reply (docs/request-reply.md).

The loop holds the path (``Replies.lock``) as a blocking caller that reads it does:
blocking callers on the same connection get their replies from it meanwhile, and the
first of them still waiting reads next when it lets go. Where the path is not made yet,
publishes the requests itself (AMQP) or offers no descriptor, a request runs on a thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from .._endpoint import Endpoint
from .._ids import stamp
from .._replies import _SLICE, Replies, _Slot, checked
from ..backend import NATIVE, Backend, Queue, ReplyPath
from ..client import Connection
from ..errors import StateError, Timeout
from ..message import Message

#: per queue: the endpoint, its backend, the connection's active index, the driver's frame
#: head, its nowait send and the size limit it was learnt with (Producer.send_nowait's checks)
_Send = tuple[Endpoint, Backend, int, bytes, Callable[[bytes], bool], int]


def watchable(path: ReplyPath) -> int | None:
    """The descriptor the loop can watch for ``path``'s replies, if it offers one."""
    return path.loop_fd()


class Waiter:
    """One request waiting on the loop; its reply slot's ``event``: ``set()`` from the loop
    or any thread wakes its coroutine."""

    __slots__ = ("loop", "thread", "fut", "error", "deadline", "slot", "mid", "dest", "timeout", "publish")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float, slot: _Slot, mid: str, dest: Queue,
                 timeout: float) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self.fut: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.deadline = deadline  # loop.time()
        self.slot, self.mid, self.dest, self.timeout = slot, mid, dest, timeout
        #: publish_one's arguments, when the request must be sent from a thread (then learn())
        self.publish: tuple[Any, ...] | None = None

    def set(self) -> None:
        if threading.get_ident() == self.thread:
            fut = self.fut
            if fut is not None and not fut.done():
                fut.set_result(None)
        else:  # a blocking caller read the reply for this coroutine
            self.loop.call_soon_threadsafe(self.wake)

    def wake(self) -> None:
        fut = self.fut
        if fut is not None and not fut.done():
            fut.set_result(None)


class LoopRequests:
    """The loop-side requests of one asyncio connection and the task reading their replies.

    A request is :meth:`begin` (made and sent), :meth:`wait` until it returns ``None``
    (awaiting each future it returns), :meth:`reply`, and always :meth:`leave`: all in
    the caller's coroutine (aio/_conn.py), so that a reply resumes one coroutine frame.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.reading: ReplyPath | None = None  # the path the loop watches (Replies.lock held)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fd = -1
        self.timer: asyncio.TimerHandle | None = None  # at the earliest deadline
        self.idle: asyncio.TimerHandle | None = None  # lets go of the path a slice after the last request
        self.waiting: dict[_Slot, Waiter] = {}
        self.sends: dict[str, _Send] = {}
        self.closed = False
        # the earliest deadline of the requests waiting (maybe passed already: one of them
        # left): the reader wakes them when it passes, so a request needs no timer of its own
        self.earliest = float("inf")

    def begin(self, destination: str, body: Any, timeout: float, headers: dict[str, str] | None,
              type: str | None) -> Waiter | None:
        """Make and send a request to wait for on the loop; ``None``: it cannot, call
        :meth:`mqprimer.Connection.request` on a thread (the reply path is not made yet,
        publishes the requests itself, as AMQP's, or cannot be awaited)."""
        conn = self.conn
        replies = conn._replies
        if replies is None or self.closed:
            return None
        path = replies.path
        if path is None or path.publishes_requests or (self.reading is not path and watchable(path) is None):
            return None
        dest = replies.known(destination, timeout, headers, type)
        if dest is None:
            dest = checked(conn, destination, timeout, headers, type)
            replies.learn(destination, dest)
        if conn._closed:
            conn._check()
        loop = asyncio.get_running_loop()
        mid, now = stamp()
        slot = replies.enter(mid)
        w = Waiter(loop, loop.time() + timeout, slot, mid, dest, timeout)
        slot.event = w
        self.waiting[slot] = w
        if w.deadline < self.earliest:
            self.earliest = w.deadline
            if self.reading is not None:
                self._arm(loop)
        try:
            payload, ttl = replies.payload(path, mid, now, body, float(timeout), headers, type)
        except BaseException:
            self.leave(w)
            raise
        # a ttl the broker keeps goes with publish; an emulated one is the envelope's expiry
        if (ttl is not None and replies.ttl is NATIVE) or not self._send(dest, payload):
            w.publish = (conn.publish_one, dest, payload, mid, None, None, ttl)
        return w

    def wait(self, w: Waiter) -> "asyncio.Future[None] | None":
        """What to await next for request ``w``; ``None``: its reply is in. Raises Timeout
        when its deadline passed, or the reader's error."""
        slot = w.slot
        if slot.env is not None:
            return None
        if w.error is not None:
            raise w.error
        loop = w.loop
        now = loop.time()
        left = w.deadline - now
        if left <= 0:
            raise Timeout(f"no reply from {w.dest.name} within {w.timeout:g}s")
        replies = self.conn._replies
        assert replies is not None
        if self.reading is None:
            self._start(replies, loop)
        fut = w.fut = loop.create_future()
        with replies.cond:
            if slot.env is not None:
                return None
            slot.turn = False  # a blocking reader handed the path over: _start takes it
        if self.reading is None:
            # a thread reads (and hands us the reply or the turn): look again in a slice
            loop.call_at(now + min(left, _SLICE), w.wake)
        return fut

    def reply(self, w: Waiter) -> Message:
        replies = self.conn._replies
        assert replies is not None
        return replies.reply(w.slot)

    def leave(self, w: Waiter) -> None:
        """Request ``w`` stops waiting (answered, timed out, failed or cancelled)."""
        del self.waiting[w.slot]
        replies = self.conn._replies
        if replies is not None:
            replies.leave(w.mid, w.slot)
        if not self.waiting and self.reading is not None and self.idle is None:
            self.idle = w.loop.call_later(_SLICE, self._idle)

    # -- sending on the loop -----------------------------------------------------------
    def _send(self, dest: Queue, payload: bytes) -> bool:
        """Send the request with the driver's nowait send (as Producer.send_nowait); False: not sent."""
        got = self.sends.get(dest.name)
        if got is None:
            return False
        ep, backend, active, head, nowait, limit = got
        if ep.backend is not backend or self.conn._active != active or len(payload) > limit:
            return False
        if not ep.lock.acquire(False):
            return False
        try:
            return nowait(head + payload)
        except Exception:  # nothing was sent (Backend.nowait_publisher): the thread's publish meets it
            return False
        finally:
            ep.lock.release()

    def learn(self, dest: Queue) -> None:
        """After a plain publish to ``dest`` succeeded (its checks passed): its nowait send, if any."""
        conn = self.conn
        ep = conn.endpoints[conn._active]
        backend = ep.backend
        if backend is None or len(self.sends) >= 1000:
            return
        fast = backend.fast_publisher(dest)
        nowait = backend.nowait_publisher(dest)
        if fast is not None and nowait is not None:
            self.sends[dest.name] = (ep, backend, conn._active, fast[0], nowait, conn.size_limit(ep)[0])

    # -- the reader: the loop watching the path ----------------------------------------
    def _start(self, replies: Replies, loop: asyncio.AbstractEventLoop) -> None:
        """Take the path and watch it on the loop; if a blocking caller holds it, it reads for us."""
        if not replies.lock.acquire(False):
            return
        path = replies.path
        fd = None if path is None else watchable(path)
        if path is None or fd is None:  # lost meanwhile: a blocking caller makes the next
            replies.lock.release()
            return
        self.reading, self.loop, self.fd = path, loop, fd
        loop.add_reader(fd, self._drain)
        self._arm(loop)
        self._drain()  # replies a blocking reader left in: the descriptor may not say so again

    def _drain(self) -> None:
        """Hand each reply in to its caller (the loop holds the path)."""
        path = self.reading
        if path is None:
            return
        replies = self.conn._replies
        assert replies is not None
        try:
            for _ in range(256):
                payload = path.receive(0)
                if payload is None:
                    return
                replies._deliver(payload)
            assert self.loop is not None
            self.loop.call_soon(self._drain)  # more in: after the others' turn
        except Exception as exc:
            self._fail(replies._lost(exc, "receive reply"))
            self._stop()

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """The timer at the earliest deadline of the requests waiting."""
        if self.timer is not None:
            if self.timer.when() <= self.earliest:
                return
            self.timer.cancel()
            self.timer = None
        if self.earliest != float("inf"):
            self.timer = loop.call_at(self.earliest, self._expire)

    def _expire(self) -> None:
        """Wake the requests whose deadline passed (they raise Timeout); arm for the next."""
        assert self.loop is not None
        self.timer = None
        now = self.loop.time()
        earliest = float("inf")
        for w in self.waiting.values():
            if w.deadline <= now:
                w.wake()
            elif w.deadline < earliest:
                earliest = w.deadline
        self.earliest = earliest
        if self.reading is not None:
            self._arm(self.loop)

    def _idle(self) -> None:
        self.idle = None
        if not self.waiting:
            self._stop()

    def _stop(self) -> None:
        """Let go of the path: a blocking caller still waiting reads next."""
        if self.reading is None:
            return
        assert self.loop is not None
        self.loop.remove_reader(self.fd)
        for h in (self.timer, self.idle):
            if h is not None:
                h.cancel()
        self.timer = self.idle = None
        self.reading = None
        replies = self.conn._replies
        assert replies is not None
        replies.lock.release()
        if replies.waiting:
            replies._hand_over(_Slot())

    def _fail(self, err: BaseException) -> None:
        """The path failed: every request of this loop still waiting raises ``err``."""
        for slot, w in self.waiting.items():
            if slot.env is None:
                w.error = err
                w.wake()

    def close(self) -> None:
        """Stop watching; the requests still waiting raise StateError."""
        self.closed = True
        self._fail(StateError("the connection is closed"))
        self._stop()
