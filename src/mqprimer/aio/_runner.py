"""Where the asyncio twin runs the blocking portable layer: off the event loop.

Every call into :mod:`mqprimer.client` / :mod:`mqprimer.consumer` may wait on a socket
(a broker that is down, frozen or slow), so it runs on a bounded pool of threads owned by
the aio object that needs it, and the coroutine awaits an asyncio future the thread
completes. The only exception is ``memory://``: its calls are in-process dictionary work
under a short lock, never I/O, and a thread hop would cost ~10x the call itself, so they
run inline (see :func:`inline_ok`).

Threads are started with ``_thread.start_new_thread``, which returns at once:
``threading.Thread.start`` waits until the new thread runs, and on a loaded machine that
wait held the loop for 20-30 ms (measured with asyncio's debug mode). The pool's threads
end when it is shut down and idle; they never outlive a closed aio object for long.
"""

from __future__ import annotations

import _thread
import asyncio
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..url import URL

T = TypeVar("T")

_INLINE_SCHEMES = frozenset({"memory"})


def inline_ok(urls: Iterable[URL]) -> bool:
    """True when every URL is a backend whose calls never wait on I/O (``memory://``)."""
    return all(u.scheme in _INLINE_SCHEMES for u in urls)


class _Job:
    __slots__ = ("loop", "fut", "fn", "args", "on_late", "always")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, fut: "asyncio.Future[Any] | None",
                 fn: Callable[..., Any], args: tuple[Any, ...], on_late: Callable[[Any], None] | None,
                 always: bool = False) -> None:
        self.loop, self.fut, self.fn, self.args, self.on_late = loop, fut, fn, args, on_late
        self.always = always


class Runner:
    """A bounded thread pool for blocking calls, awaited from the loop.

    Cancelling the awaiting coroutine does not stop a call already running on a thread (a
    thread cannot be interrupted); it runs to its end, and :meth:`call`'s ``on_late`` gets
    its result on a pool thread, so that a delivery nobody waits for any more can be given back.
    """

    def __init__(self, threads: int, name: str, *, inline: bool = False) -> None:
        self.inline = inline
        self.name = name
        self.closed = False
        self._max = threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self.pending = 0  # calls submitted and not finished (or skipped): the pool's thread may hold locks

    async def call(self, fn: Callable[..., T], *args: Any, on_late: Callable[[T], None] | None = None,
                   inline: bool = True, always: bool = False) -> T:
        """``fn(*args)`` on a pool thread (inline where :attr:`inline` and ``inline`` allow it);
        ``always``: it runs even if the caller is cancelled before it starts (``on_late`` gets
        its result), for a call that finishes what the caller already began."""
        if self.inline and inline:
            return fn(*args)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._put(_Job(loop, fut, fn, args, on_late, always))
        try:
            return await fut
        except asyncio.CancelledError:
            # the result came in, but the task was cancelled before it resumed: nobody takes it
            if on_late is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
                _thread.start_new_thread(on_late, (fut.result(),))
            raise

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on a pool thread; nobody waits for it."""
        self._put(_Job(None, None, fn, args, None))

    def _put(self, job: _Job) -> None:
        if self.closed:  # a call after close (it raises StateError in the portable layer): one thread for it
            _thread.start_new_thread(_run_one, (job,))
            return
        with self._lock:
            self.pending += 1
            spawn = self._idle == 0 and self._threads < self._max
            if spawn:
                self._threads += 1
        self._jobs.put(job)
        if spawn:
            _thread.start_new_thread(self._work, ())

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            with self._lock:
                self._idle += 1
            job = jobs.get()
            with self._lock:
                self._idle -= 1
                if job is None:
                    self._threads -= 1
                    return
            _run_one(job, self._done)

    def _done(self) -> None:
        # before the result reaches the loop: a caller resumed by it may run its next call
        # inline (Consumer.receive/ack) only once this thread has let go of every lock
        with self._lock:
            self.pending -= 1

    def shutdown(self) -> None:
        """Let the threads end once idle (never waits: callable from the loop)."""
        if self.closed:
            return
        self.closed = True
        with self._lock:
            n = self._threads
        for _ in range(n):
            self._jobs.put(None)


def _run_one(job: _Job, done: Callable[[], None] | None = None) -> None:
    fut = job.fut
    result: Any = None
    exc: BaseException | None = None
    try:
        if fut is not None and fut.cancelled() and not job.always:
            return  # cancelled before it started: nothing was done
        result = job.fn(*job.args)
    except BaseException as e:
        exc = e
    finally:
        if done is not None:
            done()  # before the result reaches the loop (Runner._done)
    if job.loop is not None:
        _resolve(job, result, exc)


def _resolve(job: _Job, result: Any, exc: BaseException | None) -> None:
    assert job.loop is not None
    try:
        job.loop.call_soon_threadsafe(_settle, job, result, exc)
    except RuntimeError:  # the loop is closed: nobody can wait for this any more
        if exc is None and job.on_late is not None:
            job.on_late(result)


def _settle(job: _Job, result: Any, exc: BaseException | None) -> None:
    fut = job.fut
    assert fut is not None
    if fut.cancelled():
        if exc is None and job.on_late is not None:
            # the caller is gone; give the result back off the loop (it may do I/O)
            _thread.start_new_thread(job.on_late, (result,))
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
