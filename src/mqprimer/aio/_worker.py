"""The asyncio twin of :class:`mqprimer.Worker`: ``await Worker(...).run()``.

It *is* the blocking worker (a subclass): the same owner loop receives, settles, applies
the retry policy, drains, recycles, reconnects and returns the same exit codes, on one
thread of its own so that the event loop never waits on a broker. What changes is where
handlers run: an ``async def`` handler runs as a task on the caller's loop (at most
``concurrency`` at once) and gets an :class:`mqprimer.aio.Message`; a plain function runs on
the blocking worker's thread pool and gets a :class:`mqprimer.Message`, as before.
SIGTERM/SIGINT are taken with ``loop.add_signal_handler`` (same drain, same second-signal
abort). Cancelling ``run()`` aborts: unsettled messages go back to the broker, then the
cancellation propagates.
"""

from __future__ import annotations

import _thread
import asyncio
import inspect
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import worker as _w
from .._worker_util import hook
from ..message import Message as _Message
from ._consumer import Message
from ._runner import Runner


def is_async_handler(handler: Callable[..., object]) -> bool:
    """An ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)


class Worker(_w.Worker):
    """Same arguments as :class:`mqprimer.Worker`; ``handler`` may be ``async def``.

    ``before`` runs just before the handler (on the loop for an async handler: it must not
    block; it may be ``async def``); ``after`` runs on the owner thread, as in the blocking worker.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._async = is_async_handler(self.handler)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls: Runner | None = None
        self._slots: asyncio.Semaphore | None = None

    async def run(self) -> int:  # type: ignore[override]
        """Consume until stopped, recycled or aborted; return the exit code (see :mod:`mqprimer.worker`)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._async:
            self._calls = Runner(max(2, self.concurrency), "mqprimer-aio-worker-call")
            self._slots = asyncio.Semaphore(self.concurrency)
            self._jobs = _Dispatch(self, loop)  # type: ignore[assignment]
        done: asyncio.Future[int] = loop.create_future()

        def owner() -> None:
            try:
                code = _w.Worker.run(self)  # not the main thread: it installs no signal handlers
            except BaseException as exc:
                loop.call_soon_threadsafe(_finish, done, None, exc)
            else:
                loop.call_soon_threadsafe(_finish, done, code, None)

        installed = self._loop_signals(loop)
        _thread.start_new_thread(owner, ())  # returns at once (see _runner: Thread.start can hold the loop)
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            self.abort(1)  # unsettled messages go back to the broker when the owner closes its consumer
            while not done.done():
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    continue
                except BaseException:
                    break
            raise
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            for task in list(self._tasks):
                task.cancel()
            if self._calls is not None:
                self._calls.shutdown()

    def _start_pool(self) -> None:
        if not self._async:
            super()._start_pool()

    def _loop_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return []
        out: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum, None)
            out.append(signum)
        return out

    # -- async handlers (on the loop) ------------------------------------------------------
    def _spawn(self, msg: _Message) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: _Message) -> None:
        assert self._slots is not None and self._calls is not None
        async with self._slots:
            if self._release:  # stopping: what has not started goes back to the broker
                self._results.put((msg, _w._RELEASED, 0.0))
                return
            error: BaseException | None = None
            start = time.perf_counter()
            am = Message(msg, self._calls)
            try:
                before: Any = self.before
                if before is not None:
                    if inspect.iscoroutinefunction(before):
                        await before(am)
                    else:
                        hook(before, am)
                handler: Any = self.handler
                result = await handler(am)
                if result is not None and msg.reply_to is not None and not msg._replied:
                    await am.reply(result)  # a request: the result is the reply, sent before the ack
            except BaseException as exc:  # every failure is an outcome (a cancelled task too: abort)
                error = exc
            self._results.put((msg, error, time.perf_counter() - start))


class _Dispatch:
    """Stands in for the blocking worker's job queue: a job becomes a task on the loop."""

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop) -> None:
        self._worker = worker
        self._loop = loop

    def put(self, msg: _Message | None) -> None:  # called on the owner thread
        if msg is not None:
            self._loop.call_soon_threadsafe(self._worker._spawn, msg)


def _finish(done: "asyncio.Future[int]", code: int | None, exc: BaseException | None) -> None:
    if done.done():
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        assert code is not None
        done.set_result(code)
