"""A nudge for beanstalkd 1.12's lost lease expiries (docs/backend-beanstalk.md).

beanstalkd 1.12 can miss the end of a reserved job's TTR: it keeps each connection in a
heap by the time it must next look at it, and when that look comes in the same
microsecond as the job's deadline (its clock is ``gettimeofday``, its check is
``deadline >= now``) it finds nothing due and drops the connection from the heap for
good. The job then stays reserved, ``time-left`` below zero and ``timeouts`` 0, until
that connection sends a command or closes (beanstalkd issue #262, pull request #334).
On a fresh server (few tubes, a fast tick) it kept 47 of 100 jobs whose holders were
silent (raw sockets, no mqprimer involved); with 3,000 tubes to scan per tick, none.

Any command from the holding connection makes beanstalkd schedule it again, and a
deadline already past is then handled on the next tick. So a subscription that holds
jobs (or may, through a waiting reserve nobody reads) and goes quiet past a lease gets
one cheap command (``list-tube-used``) from this thread, shortly after the lease ended.
One thread per process, sleeping until the earliest lease; it ends when nothing is
left to watch, so closed consumers leave no thread behind.
"""

from __future__ import annotations

import _thread
import heapq
import itertools
import os
import threading
import time
import weakref
from typing import Protocol


class Nudged(Protocol):
    wake_at: float | None

    def nudge(self, now: float) -> float | None:
        """Do what is due at ``now``; the next time to be called, or ``None``.

        Sets ``wake_at`` to it (under the lock that guards its connection, with which the
        subscription itself schedules: a job held meanwhile is never left unwatched)."""


class _Watchdog:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # also in a forked child: the parent's thread is not there, and its lock may be held
        self.cond = threading.Condition(threading.Lock())
        self.heap: list[tuple[float, int, weakref.ref[Nudged]]] = []
        self.seq = itertools.count()
        # a thread started with _thread: threading.Thread.start() waits until the thread runs
        # (20-30 ms on a loaded machine), and due() is called on an asyncio loop too (AsyncSub)
        self.running = False

    def due(self, when: float, sub: Nudged) -> None:
        """Call ``sub.nudge()`` at ``when`` (monotonic); the caller has set ``sub.wake_at``."""
        with self.cond:
            heapq.heappush(self.heap, (when, next(self.seq), weakref.ref(sub)))
            if not self.running:  # also after a fork (_reset)
                self.running = True
                _thread.start_new_thread(self._run, ())
            elif self.heap[0][0] == when:
                self.cond.notify()

    def forget(self) -> None:
        """A subscription closed: wake the thread to drop it (and end if nothing is left)."""
        with self.cond:
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                # entries of closed or collected subscriptions go now, not when their time comes
                self.heap = [e for e in self.heap if (s := e[2]()) is not None and s.wake_at is not None]
                heapq.heapify(self.heap)
                if not self.heap:
                    self.running = False
                    return
                when, _, ref = self.heap[0]
                wait = when - time.monotonic()
                if wait > 0:
                    self.cond.wait(wait)
                    continue
                heapq.heappop(self.heap)
            sub = ref()
            if sub is None:
                continue
            nxt = sub.nudge(time.monotonic())  # outside the lock: it does I/O
            if nxt is not None:
                with self.cond:
                    heapq.heappush(self.heap, (nxt, next(self.seq), ref))


watchdog = _Watchdog()
os.register_at_fork(after_in_child=watchdog._reset)
