"""gearmand requests on the running event loop's own non-blocking I/O (backend.py's asyncio SPI).

Why: a gearman send or ack is one round trip (~0.5-0.7 ms with gearmand's sqlite queue,
most of it gearmand's fsyncs). Through a thread the asyncio twin adds two wake-ups to it:
the pool thread's, and the loop's once the answer is in; on this 2-core machine the loop's
wake-up after sleeping through the round trip cost 120-190 us (measured inside the twin:
publish returned on its thread -> send resumed on the loop), three times bench_aio's idle
``thread hop``, and it held send at 0.72-0.80x the blocking API. Here the request is written
with ``MSG_DONTWAIT`` and the answer read when it is there: nothing waits on the loop.

The sockets stay blocking (their mode is the blocking path's; asyncio's debug mode refuses
``loop.sock_*`` on them): the per-call flag makes each call non-blocking. Answers go into
the :class:`~._gearman_proto.Link`'s own buffer, so either path may take the connection
between two requests. While the loop has nothing else to do (no callback ready, no timer
due, none of its sockets readable: its selector is watched too), the answer is awaited in
the kernel, as the blocking path does, for at most ``_IDLE_WAIT``; else (or past that) on
the loop's selector.
"""

from __future__ import annotations

import asyncio
import select
import socket
import weakref

from ._gearman_proto import Link

_DONTWAIT = socket.MSG_DONTWAIT
_IDLE_WAIT = 0.002  # the longest the loop waits in the kernel for an answer, and only while idle
_selector_fds: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int | None]" = weakref.WeakKeyDictionary()


def _selector_fd(loop: asyncio.AbstractEventLoop) -> int | None:
    """The fd of ``loop``'s selector (asyncio's own selector loop on epoll); ``None``: never
    wait in the kernel on this loop, always through its selector."""
    got = _selector_fds.get(loop, -1)
    if got == -1:
        got = None
        if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            fileno = getattr(getattr(loop, "_selector", None), "fileno", None)
            if fileno is not None and hasattr(loop, "_ready") and hasattr(loop, "_scheduled"):
                got = fileno()
        _selector_fds[loop] = got
    return got


def _idle_readable(loop: asyncio.AbstractEventLoop, fd: int, until: float) -> bool:
    """Whether ``fd`` became readable within a short kernel wait made only while the loop is idle."""
    efd = _selector_fd(loop)
    if efd is None:
        return False
    ready = loop._ready  # type: ignore[attr-defined]
    if ready and not all(h._cancelled for h in ready):
        return False
    now = loop.time()
    bound = min(_IDLE_WAIT, until - now)
    scheduled = loop._scheduled  # type: ignore[attr-defined]
    if scheduled:
        bound = min(bound, scheduled[0]._when - now)
    if bound <= 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(efd, select.POLLIN)  # anything for the loop ends the wait at once
    return any(f == fd for f, _ in poller.poll(bound * 1000))


def _wake(fut: "asyncio.Future[bool]", ready: bool) -> None:
    if not fut.done():
        fut.set_result(ready)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, writable: bool, deadline: float) -> bool:
    """Wait on the loop's selector until ``fd`` is readable (writable); ``False``: the deadline passed."""
    fut: asyncio.Future[bool] = loop.create_future()
    if writable:
        loop.add_writer(fd, _wake, fut, True)
    else:
        loop.add_reader(fd, _wake, fut, True)
    timer = loop.call_at(deadline, _wake, fut, False)
    try:
        return await fut
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)
        timer.cancel()


def drop(link: Link) -> None:
    """Make a connection that is out of step unusable at once: the blocking path's next call
    meets a lost connection and the portable layer reconnects; gearmand gives its jobs back."""
    try:
        link.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


async def send(link: Link, data: bytes) -> None:
    """Write ``data`` whole (after what a ``send_nowait`` left over). Cancelled or timed out
    with the socket's buffer full, the connection is dropped: a request may be half out."""
    if link.rest:
        data, link.rest, link.send = link.rest + data, b"", link.sock.sendall
    sock = link.sock
    try:
        sent = sock.send(data, _DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent >= len(data):
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + link.io_timeout
    try:
        while sent < len(data):
            if not await _ready(loop, sock.fileno(), True, deadline):
                raise TimeoutError("gearmand took no data within the I/O timeout")
            try:
                sent += sock.send(data[sent:], _DONTWAIT)
            except BlockingIOError:
                pass
    except BaseException:
        drop(link)
        raise


async def fill(link: Link, deadline: float) -> None:
    """Read what has arrived into ``link.buf``, waiting (never blocking the loop) until
    ``deadline`` (``loop.time()``) at most: past it :class:`TimeoutError`. EOF: ConnectionError."""
    if link.fill_nowait():
        return
    loop = asyncio.get_running_loop()
    fd = link.sock.fileno()
    while True:
        if not _idle_readable(loop, fd, deadline) and not await _ready(loop, fd, False, deadline):
            raise TimeoutError("gearmand did not answer within the I/O timeout")
        if link.fill_nowait():
            return
