"""Where the asyncio twin runs the blocking portable layer: off the event loop.

Every call into :mod:`mqprimer.client` / :mod:`mqprimer.consumer` may wait on a socket
(a broker that is down, frozen or slow), so it runs on a bounded pool of threads owned by
the aio object that needs it, and the coroutine awaits its future. The only exception is
``memory://``: its calls are in-process dictionary work under a short lock, never I/O, and
a thread hop would cost ~10x the call itself, so they run inline (see :func:`inline_ok`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..url import URL

T = TypeVar("T")

_INLINE_SCHEMES = frozenset({"memory"})


def inline_ok(urls: Iterable[URL]) -> bool:
    """True when every URL is a backend whose calls never wait on I/O (``memory://``)."""
    return all(u.scheme in _INLINE_SCHEMES for u in urls)


class Runner:
    """A bounded thread pool for blocking calls, awaited from the loop.

    Cancelling the awaiting coroutine does not stop a call already running on a thread (a
    thread cannot be interrupted); it runs to its end, and :meth:`call`'s ``on_late`` gets
    its result, so that a delivery nobody waits for any more can be given back.
    """

    def __init__(self, threads: int, name: str, *, inline: bool = False) -> None:
        self.inline = inline
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.closed = False

    async def call(self, fn: Callable[..., T], *args: Any, on_late: Callable[[T], None] | None = None,
                   inline: bool = True) -> T:
        """``fn(*args)`` on a pool thread (inline where :attr:`inline` and ``inline`` allow it)."""
        if self.inline and inline:
            return fn(*args)
        fut = self._pool.submit(fn, *args)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if on_late is not None:
                fut.add_done_callback(lambda f: _late(f, on_late))
            raise

    def submit(self, fn: Callable[..., T], *args: Any) -> "concurrent.futures.Future[T]":
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        """Let the threads end once idle (never waits: callable from the loop)."""
        self.closed = True
        self._pool.shutdown(wait=False)


def _late(fut: "concurrent.futures.Future[T]", on_late: Callable[[T], None]) -> None:
    # runs on the pool thread that finished the call (or at once if it had finished)
    if fut.cancelled() or fut.exception() is not None:
        return
    on_late(fut.result())
