"""Waiting for a driver's socket on the running asyncio loop without blocking the loop.

Shared by the drivers that implement backend.py's asyncio SPI on their own blocking
sockets (``_beanstalk_aio.py``, ``_gearman_aio.py``): they write with ``MSG_DONTWAIT`` and
wait here for the socket to become readable (or writable) through the loop's selector.
The sockets stay blocking, their mode being the blocking path's, so ``loop.sock_*`` (which
asyncio's debug mode refuses on such sockets) is not used.

A reply through the selector costs a selector round and a task step (~20-60 us here, as
much as a beanstalkd round trip, and the loop's wake-up after sleeping through a gearmand
round trip cost 120-190 us). So :func:`idle_readable` first waits in the kernel, as the
blocking path does, but only while the loop has nothing else to do: no callback ready, no
timer due before the wait ends, and nothing for the loop's own selector, whose fd is
polled too and ends the wait the moment it has an event. A frozen or slow broker then holds
up nothing. This reads asyncio's private ``_ready``, ``_scheduled`` and ``_selector``; on
any other loop (uvloop, Windows) :func:`selector_fd` says ``None`` and every wait goes
through the selector, which is sound, only slower.
"""

from __future__ import annotations

import asyncio
import select
import weakref
from typing import Any

_pollers: "dict[tuple[int, int], select.poll]" = {}
_last: list[Any] = [lambda: None, None]  # (weak reference to the loop, its selector fd) last asked for
_selector_fds: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int | None]" = weakref.WeakKeyDictionary()


def selector_fd(loop: asyncio.AbstractEventLoop) -> int | None:
    """The fd of ``loop``'s selector, where it is asyncio's own selector loop with one that
    has an fd (epoll); ``None``: no idle waits on this loop (always through the selector)."""
    last = _last
    if last[0]() is loop:
        return last[1]  # type: ignore[no-any-return]
    got = _selector_fds.get(loop, -1)
    if got == -1:
        fd = None
        if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            fileno = getattr(getattr(loop, "_selector", None), "fileno", None)
            if fileno is not None and hasattr(loop, "_ready") and hasattr(loop, "_scheduled"):
                fd = fileno()
        got = _selector_fds[loop] = fd
    _last[:] = [weakref.ref(loop), got]  # one loop per process, mostly: no weak-dictionary lookup per call
    return got


def idle_readable(loop: asyncio.AbstractEventLoop, fd: int, until: float | None, longest: float) -> bool:
    """Whether ``fd`` became readable within a kernel wait of at most ``longest`` seconds
    (and never past ``until``, ``loop.time()``), made only while ``loop`` is idle (see above);
    ``False`` at once when it is not."""
    efd = selector_fd(loop)
    if efd is None:
        return False
    ready = loop._ready  # type: ignore[attr-defined]
    if ready and not all(h._cancelled for h in ready):  # cancelled ones wait for the loop's next turn
        return False
    now = loop.time()
    bound = longest if until is None else min(longest, until - now)
    scheduled = loop._scheduled  # type: ignore[attr-defined]
    if scheduled:
        bound = min(bound, scheduled[0]._when - now)
    if bound <= 0:
        return False
    key = (efd, fd)  # fd numbers: one reused by another socket is polled alike, correctly
    poller = _pollers.get(key)
    if poller is None:
        if len(_pollers) >= 256:
            _pollers.clear()
        poller = _pollers[key] = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(efd, select.POLLIN)  # anything for the loop ends the wait at once
    for f, _ in poller.poll(bound * 1000):  # a loop, not any(genexpr): ~1 us less per reply
        if f == fd:
            return True
    return False


def _wake(fut: "asyncio.Future[bool]", ready: bool) -> None:
    if not fut.done():
        fut.set_result(ready)


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, writable: bool, deadline: float | None) -> bool:
    """Wait on the loop's selector until ``fd`` is readable (``writable``: writable);
    ``False``: ``deadline`` (``loop.time()``; ``None``: none) passed first."""
    fut: asyncio.Future[bool] = loop.create_future()
    if writable:
        loop.add_writer(fd, _wake, fut, True)
    else:
        loop.add_reader(fd, _wake, fut, True)
    timer = None if deadline is None else loop.call_at(deadline, _wake, fut, False)
    try:
        return await fut
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)
        if timer is not None:
            timer.cancel()
