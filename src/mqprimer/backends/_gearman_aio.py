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
import socket

from ._gearman_proto import Link
from ._loop_io import idle_readable, wait_fd

_DONTWAIT = socket.MSG_DONTWAIT
_IDLE_WAIT = 0.002  # the longest the loop waits in the kernel for an answer, and only while idle


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
            if not await wait_fd(loop, sock.fileno(), True, deadline):
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
        if not idle_readable(loop, fd, deadline, _IDLE_WAIT) and not await wait_fd(loop, fd, False, deadline):
            raise TimeoutError("gearmand did not answer within the I/O timeout")
        if link.fill_nowait():
            return
