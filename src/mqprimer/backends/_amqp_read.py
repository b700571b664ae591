"""The input side of an AMQP :class:`~._amqp_link.Link`: which thread reads the socket.

The I/O thread reads the socket and hands what it read to the thread waiting for it (a
consumer's delivery, a caller's reply): two thread wake-ups per message, where pika's
``BlockingConnection`` takes one, since there the waiting thread reads its own socket. So a
thread that waits for a delivery or a reply and finds the I/O thread idle (blocked in
``epoll_wait``) takes its place until what it waits for has come: it runs pika's own loop
(poll, pika's dispatch, pika's callbacks and due timers, the output's coalesce) on the
socket and the loop's wake-up socket, then gives the loop back. A lone request/reply round
trip then costs one wake-up on each side, as with raw pika (docs/request-reply.md).

Why this is safe: :attr:`Reader.lock` is held by whichever thread runs pika code. The I/O
thread holds it at all times except inside ``epoll_wait`` (:class:`_Gate` wraps pika's epoll
object to release it there), and a waiting thread only ever takes it without waiting, so
pika's objects are never touched by two threads at once. While a waiting thread leads, the
socket is masked out of the I/O thread's epoll set, so that the I/O thread is not woken for
the same bytes (its wake-up socket stays in: work handed to the loop meanwhile wakes both,
and whoever holds the lock runs it). Giving the loop back restores the socket's events
(epoll re-checks readiness then: nothing read is left waiting), and wakes the I/O thread if
a timer now falls due before the end of its wait. This reaches into pika 1.x internals
(``IOLoop._poller``, its ``_fd_events``, ``_dispatch_fd_events``, ``_create_poller``);
without them every wait is the I/O thread's hand-off, as before.
"""

from __future__ import annotations

import math
import select
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")
_IDLE_WAIT = 5.0  # pika's own longest epoll wait without timers
_LATE_OK = 0.005


class _Gate:
    """pika's epoll object for the I/O thread: the loop's lock is free only while it waits."""

    __slots__ = ("ep", "lock", "until", "led", "handlers")

    def __init__(self, lock: threading.Lock, handlers: dict[int, Any]) -> None:
        self.ep = select.epoll()
        self.lock = lock
        self.until = math.inf  # when the I/O thread's current wait ends (inf: it is not waiting)
        self.led = False  # another thread ran the loop during this wait
        self.handlers = handlers  # pika's fd -> handler map

    def register(self, fd: int, events: int) -> None:
        self.ep.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self.ep.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self.ep.unregister(fd)

    def close(self) -> None:
        self.ep.close()

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        self.until = time.monotonic() + timeout
        self.lock.release()
        try:
            events = self.ep.poll(timeout)
        finally:
            self.until = math.inf
            self.lock.acquire()
        if self.led:
            # what epoll said before a leader ran may be stale: a socket it closed meanwhile
            # has no handler any more (pika's dispatch would fail on it); the rest is harmless
            # (a read finds nothing, a write has nothing to send)
            self.led = False
            handlers = self.handlers
            events = [e for e in events if e[0] in handlers]
        return events


class Reader:
    """Who runs the ioloop of one connection (see the module doc). Made right after the
    connection opened, before the I/O thread starts; the I/O thread calls :meth:`enter`."""

    def __init__(self, ioloop: Any, sock: Any, flush: Callable[[], None],
                 on_crash: Callable[[BaseException], None]) -> None:
        self.lock = threading.Lock()
        self.led = 0  # waits a user thread led until it read what it waited for (tests read it)
        self.leader: threading.Thread | None = None  # the user thread running the loop now
        self._ioloop = ioloop
        self._flush = flush  # the output's coalesce: what pika buffered leaves now
        self._on_crash = on_crash  # pika itself failed in a leading thread: end the connection
        poller: Any = getattr(ioloop, "_poller", None)
        self._ok = (sock is not None and poller is not None and hasattr(poller, "_fd_events")
                    and hasattr(poller, "_dispatch_fd_events") and hasattr(poller, "_create_poller"))
        if not self._ok:
            return
        self._gate = _Gate(self.lock, poller._fd_handlers)
        self._poller = poller
        self._fd = sock.fileno()
        self._intr = poller._r_interrupt.fileno()
        # the I/O thread's poller (made when its loop starts) is the gate
        poller._create_poller = lambda: self._gate

    def enter(self) -> None:
        """The I/O thread, before its loop: it holds the lock from now on (but in epoll)."""
        self.lock.acquire()

    def _events(self) -> int:
        fd, events = self._fd, 0
        for evt, fds in self._poller._fd_events.items():
            if fd in fds:
                events |= evt
        return events

    def get(self, q: SimpleQueue[T], timeout: float | None) -> T:
        """``q.get(True, timeout)``, reading the socket from this thread when the I/O
        thread is idle; raises ``queue.Empty`` after ``timeout`` s."""
        if not self._ok or not self.lock.acquire(blocking=False):
            return q.get(True, timeout)
        try:
            # the lock is free while the I/O thread waits in epoll, but also before its loop
            # starts and in the moment after epoll returned: lead only in the first case
            if q.empty() and self._gate.until != math.inf and not self._poller._stopping:
                self._lead(q, None if timeout is None else time.monotonic() + timeout)
                if not q.empty():
                    self.led += 1
        finally:
            self.lock.release()
        return q.get_nowait()

    def _lead(self, q: SimpleQueue[Any], deadline: float | None) -> None:
        gate, poller, ioloop, fd = self._gate, self._poller, self._ioloop, self._fd
        mine = select.poll()
        mine.register(self._intr, select.POLLIN)
        gate.led = True
        self.leader = threading.current_thread()
        gate.ep.modify(fd, 0)  # the I/O thread sleeps on: these bytes are this thread's
        try:
            while q.empty() and not poller._stopping and fd in poller._fd_handlers:
                wait = ioloop._get_remaining_interval()
                wait = _IDLE_WAIT if wait is None else wait
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    wait = min(wait, left)
                mine.register(fd, self._events())  # pika wants writability at times
                ready = mine.poll(wait * 1000)
                poller._dispatch_fd_events(dict(ready))
                ioloop.process_timeouts()  # pika's callbacks, due timers: deliveries' hand-over
                self._flush()
        except Exception as exc:  # pika itself failed: what the I/O thread would do
            self._on_crash(exc)
        finally:
            self.leader = None
            if not poller._stopping:
                try:
                    gate.ep.modify(fd, self._events())
                except OSError:  # the socket is gone (pika closed it): nothing to restore
                    pass
            nxt = ioloop._get_remaining_interval()
            # (the I/O thread's own wait ends a little after the timer it waits for: epoll
            # rounds up to whole ms; a timer served a few ms late harms nobody)
            if nxt is not None and time.monotonic() + nxt < gate.until - _LATE_OK:
                poller.wake_threadsafe()  # a timer falls due before the I/O thread would look
