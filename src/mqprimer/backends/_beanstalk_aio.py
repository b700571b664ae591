"""beanstalkd commands on the running event loop's own non-blocking I/O (the asyncio SPI).

The blocking path talks to beanstalkd over a blocking socket (kernel-side timeouts, see
beanstalk.py's ``_connect``); a thread hop around each call costs ~50 us, half of a round
trip, so the asyncio twin could not reach 0.8x of the blocking API through a thread
(docs/asyncio.md). Here the same socket is written with ``MSG_DONTWAIT`` and read when the
loop's selector says it is readable: nothing waits on the loop, whatever beanstalkd does.

The socket itself stays blocking (its mode is the blocking path's, and asyncio's debug mode
refuses ``loop.sock_*`` on such a socket): the per-call flag makes each call non-blocking.
Replies are read into this module's own buffer, not greenstalk's reader: between commands
that reader holds nothing (beanstalkd only answers commands, and every answer is read in
full), so either path may take the connection between two commands.
"""

from __future__ import annotations

import asyncio
import select
import socket
import weakref
from collections.abc import Callable
from typing import Any

from greenstalk import _parse_response

_DONTWAIT = socket.MSG_DONTWAIT
_CHUNK = 1 << 17
_IDLE_WAIT = 0.02  # the longest wait for a reply in the kernel while the loop is idle (Exchange._idle_ready)
_pollers: "dict[tuple[int, int], select.poll]" = {}
_last: list[Any] = [lambda: None, None]  # (weak reference to the loop, its selector fd) last asked for
_selector_fds: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int | None]" = weakref.WeakKeyDictionary()


def _selector_fd(loop: asyncio.AbstractEventLoop) -> int | None:
    """The fd of ``loop``'s selector, where it is asyncio's own selector loop with one that
    has an fd (epoll); ``None``: no idle waits on this loop (always through the selector)."""
    last = _last
    if last[0]() is loop:
        return last[1]  # type: ignore[no-any-return]
    got = _selector_fds.get(loop, -1)
    if got == -1:
        fd = None
        if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            sel = getattr(loop, "_selector", None)
            fileno = getattr(sel, "fileno", None)
            if fileno is not None and all(hasattr(loop, a) for a in ("_ready", "_scheduled")):
                fd = fileno()
        got = _selector_fds[loop] = fd
    _last[:] = [weakref.ref(loop), got]  # one loop per process, mostly: no weak-dictionary lookup per call
    return got


def _wake(fut: "asyncio.Future[bool]", ready: bool) -> None:
    if not fut.done():
        fut.set_result(ready)


class Exchange:
    """One command and its reply on a socket shared with the blocking path (under its lock).

    ``deadline`` (``loop.time()``, i.e. ``time.monotonic()``): past it a read raises
    :class:`TimeoutError`; :attr:`started` tells whether any byte of the reply was read
    (a command whose reply was not touched can be left to the blocking path to read).
    """

    __slots__ = ("sock", "fd", "loop", "buf", "started")

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop
        self.buf = bytearray()
        self.started = False

    def write(self, data: bytes) -> int:
        """Write what the socket takes now (a command is ~30 bytes: all of it, unless the
        buffer is full); the rest, if any, with :meth:`send`. Synchronous, as the other
        ``take``/``pull`` methods: a coroutine per step costs ~1 us, a tenth of the budget."""
        try:
            return self.sock.send(data, _DONTWAIT)
        except BlockingIOError:
            return 0

    async def send(self, data: bytes, sent: int = 0) -> None:
        """Write ``data`` whole, from offset ``sent``."""
        while True:
            try:
                sent += self.sock.send(data[sent:] if sent else data, _DONTWAIT)
            except BlockingIOError:
                pass
            if sent >= len(data):
                return
            try:
                await self._wait(self.loop.add_writer, self.loop.remove_writer, None)
            except asyncio.CancelledError:
                if sent:
                    drop(self.sock)  # half a command written: nothing can follow it
                raise

    async def _wait(self, add: Callable[..., None], remove: Callable[[int], object], deadline: float | None) -> None:
        loop = self.loop
        fut: asyncio.Future[bool] = loop.create_future()
        add(self.fd, _wake, fut, True)
        timer = None if deadline is None else loop.call_at(deadline, _wake, fut, False)
        try:
            ready = await fut
        finally:
            remove(self.fd)
            if timer is not None:
                timer.cancel()
        if not ready:
            raise TimeoutError("beanstalkd did not answer within the I/O timeout")

    def _idle_ready(self, until: float | None) -> bool:
        """Whether the socket became readable in a short wait made while the loop has nothing
        else to do (no callback ready, no timer due before it ends, no other I/O: the loop's
        own selector is watched too, and ends the wait the moment it has an event).

        A reply takes ~20-60 us; waking through the selector and a task step costs as much
        again here (bench_aio: 0.5x of the blocking API with every reply awaited). So the
        caller waits in the kernel, as the blocking path does, only while nobody else could
        have run meanwhile, and at most _IDLE_WAIT: a frozen or slow broker then holds up
        nothing (a waiting callback, a due timer or another socket ends the wait at once)."""
        loop = self.loop
        efd = _selector_fd(loop)
        if efd is None:
            return False
        ready = loop._ready  # type: ignore[attr-defined]
        if ready and not all(h._cancelled for h in ready):  # cancelled ones wait for the loop's next turn
            return False
        now = loop.time()
        bound = _IDLE_WAIT if until is None else min(_IDLE_WAIT, until - now)
        scheduled = loop._scheduled  # type: ignore[attr-defined]
        if scheduled:
            bound = min(bound, scheduled[0]._when - now)
        if bound <= 0:
            return False
        key = (efd, self.fd)  # fd numbers: one reused by another socket is polled alike, correctly
        poller = _pollers.get(key)
        if poller is None:
            if len(_pollers) >= 256:
                _pollers.clear()
            poller = _pollers[key] = select.poll()
            poller.register(self.fd, select.POLLIN)
            poller.register(efd, select.POLLIN)
        for fd, _ in poller.poll(bound * 1000):
            if fd == self.fd:
                return True
        return False

    def pull(self, until: float | None) -> bool:
        """Bytes of the reply read into the buffer after a wait on an idle loop (_idle_ready);
        ``False``: none came in that wait (await :meth:`line`/:meth:`readable` then)."""
        if not self._idle_ready(until):
            return False
        try:
            data = self.sock.recv(_CHUNK, _DONTWAIT)
        except BlockingIOError:
            return False
        if not data:
            raise ConnectionError("unexpected EOF from beanstalkd")
        self.started = True
        self.buf += data
        return True

    def take_line(self) -> bytes | None:
        """The next reply line if the buffer holds it whole, else ``None``."""
        buf = self.buf
        end = buf.find(b"\n")
        if end < 0:
            return None
        out = bytes(buf[: end + 1])
        del buf[: end + 1]
        return out

    def take(self, n: int) -> bytes | None:
        """``n`` bytes if the buffer holds them, else ``None``."""
        buf = self.buf
        if len(buf) < n:
            return None
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def readable(self, until: float) -> bool:
        """Wait for the reply until ``until``; ``False``: not a byte came (the command stays unanswered)."""
        if self._idle_ready(until):
            return True
        try:
            await self._wait(self.loop.add_reader, self.loop.remove_reader, until)
        except TimeoutError:
            return False
        return True

    async def _fill(self, deadline: float | None, wait: bool) -> None:
        while True:
            if wait and not self._idle_ready(deadline):
                await self._wait(self.loop.add_reader, self.loop.remove_reader, deadline)
            try:
                data = self.sock.recv(_CHUNK, _DONTWAIT)
            except BlockingIOError:
                wait = True
                continue
            if not data:
                raise ConnectionError("unexpected EOF from beanstalkd")
            self.started = True
            self.buf += data
            return

    async def line(self, deadline: float | None, wait: bool = True) -> bytes:
        """The next reply line, CRLF included (``wait=False``: the socket is known readable)."""
        buf = self.buf
        while (end := buf.find(b"\n")) < 0:
            await self._fill(deadline, wait)
            wait = True
        out = bytes(buf[: end + 1])
        del buf[: end + 1]
        return out

    async def exactly(self, n: int, deadline: float | None) -> bytes:
        buf = self.buf
        while len(buf) < n:
            await self._fill(deadline, True)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def left(self) -> bool:
        """Bytes beyond the replies read: the connection is out of step with its commands."""
        return bool(self.buf)


def drop(sock: socket.socket) -> None:
    """Make the connection unusable at once (the blocking path's next call meets a lost
    connection and the portable layer reconnects; beanstalkd returns its reserved jobs)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


async def put(sock: socket.socket, frame: bytes, io_timeout: float) -> int:
    """Send one ``put`` frame and return the job id (BeanstalkBackend.publish_async)."""
    loop = asyncio.get_running_loop()
    ex = Exchange(sock, loop)
    try:
        cmd = frame
        if (sent := ex.write(cmd)) < len(cmd):  # nearly always all at once
            await ex.send(cmd, sent)
        until = loop.time() + io_timeout
        line = (ex.take_line() if ex.pull(until) else None) or await ex.line(until)
        if ex.left():
            raise ConnectionError("bytes beyond a reply: the connection is out of step")
    except BaseException:  # also cancelled with the reply unread: nothing else can use the connection
        drop(sock)
        raise
    if line[:9] == b"INSERTED " and line[-1:] == b"\n":
        return int(line[9:])
    return int(_parse_response(line, b"INSERTED")[0])  # an error reply, in step: greenstalk's exception
