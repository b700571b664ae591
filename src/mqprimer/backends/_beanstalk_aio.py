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
import socket

from greenstalk import _parse_response

from ._loop_io import idle_readable, wait_fd

_DONTWAIT = socket.MSG_DONTWAIT
_CHUNK = 1 << 17
_IDLE_WAIT = 0.02  # the longest wait for a reply in the kernel while the loop is idle (_loop_io.idle_readable)


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

    def reset(self) -> "Exchange":
        """This exchange, ready for the next command (one per subscription and loop, reused:
        its buffer is empty after every reply read in full, and a call that leaves it
        otherwise drops the connection)."""
        self.started = False
        if self.buf:
            self.buf.clear()
        return self

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
                await self._wait(True, None)
            except asyncio.CancelledError:
                if sent:
                    drop(self.sock)  # half a command written: nothing can follow it
                raise

    async def _wait(self, writable: bool, deadline: float | None) -> None:
        if not await wait_fd(self.loop, self.fd, writable, deadline):
            raise TimeoutError("beanstalkd did not answer within the I/O timeout")

    def _idle_ready(self, until: float | None) -> bool:
        """Whether the socket became readable in a short kernel wait made while the loop has
        nothing else to do (_loop_io.idle_readable): a reply takes ~20-60 us, and waking
        through the selector and a task step costs as much again here (bench_aio: 0.5x of the
        blocking API with every reply awaited there)."""
        return idle_readable(self.loop, self.fd, until, _IDLE_WAIT)

    def pull(self, until: float | None) -> bool:
        """Bytes of the reply read into the buffer after a wait on an idle loop (_idle_ready);
        ``False``: none came in that wait (await :meth:`line`/:meth:`readable` then)."""
        if not idle_readable(self.loop, self.fd, until, _IDLE_WAIT):
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

    def quick_line(self, until: float | None) -> bytes | None:
        """The next reply line when the buffer holds it, or it came whole in a wait on an idle
        loop (:meth:`pull`); ``None``: not yet (await :meth:`line`, or :meth:`readable` while
        :attr:`started` is false). One call where ``take_line``/``pull``/``take_line`` were
        three: this is the common path of every command, and its Python costs as much CPU as
        the syscalls (docs/backend-beanstalk.md, "asyncio")."""
        buf = self.buf
        end = buf.find(b"\n")
        if end < 0:
            if not idle_readable(self.loop, self.fd, until, _IDLE_WAIT):
                return None
            try:
                data = self.sock.recv(_CHUNK, _DONTWAIT)
            except BlockingIOError:
                return None
            if not data:
                raise ConnectionError("unexpected EOF from beanstalkd")
            self.started = True
            if buf:
                buf += data
            else:
                end = data.find(b"\n")
                if end == len(data) - 1:  # the whole reply and nothing else: no copy through the buffer
                    return data
                buf += data
            end = buf.find(b"\n")
            if end < 0:
                return None
        out = bytes(buf[: end + 1])
        del buf[: end + 1]
        return out

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
            await self._wait(False, until)
        except TimeoutError:
            return False
        return True

    async def _fill(self, deadline: float | None, wait: bool) -> None:
        while True:
            if wait and not self._idle_ready(deadline):
                await self._wait(False, deadline)
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
        line = ex.quick_line(until) or await ex.line(until)
        if ex.buf:
            raise ConnectionError("bytes beyond a reply: the connection is out of step")
    except BaseException:  # also cancelled with the reply unread: nothing else can use the connection
        drop(sock)
        raise
    if line[:9] == b"INSERTED " and line[-1:] == b"\n":
        return int(line[9:])
    return int(_parse_response(line, b"INSERTED")[0])  # an error reply, in step: greenstalk's exception
