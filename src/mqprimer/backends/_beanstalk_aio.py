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
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import greenstalk
from greenstalk import _parse_response

from ..backend import Delivery, NotNow

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


def _reserved_head(line: bytes) -> tuple[int, int]:
    """(job id, size) of a ``RESERVED`` reply; greenstalk's exceptions for any other."""
    if line[:9] == b"RESERVED " and line[-1:] == b"\n":
        head = line[9:].split()
        return int(head[0]), int(head[1])
    jid, size = (int(n) for n in _parse_response(line, b"RESERVED"))
    return jid, size


class AsyncSub:
    """:class:`~._beanstalk_sub.BeanstalkSub`'s asyncio SPI (mixed in; its state is that class's).

    Each call takes the subscription's lock without waiting (busy: :class:`NotNow`) and holds
    it while a command is out, as the blocking methods do, so the two paths and the lease
    watchdog (whose nudge only runs while the lock is free) share one connection: beanstalkd
    settles a job only on the connection that reserved it. A cancelled call either leaves a
    waiting reserve unread (``pending``, exactly as a blocking receive that timed out does) or
    hands the rest of its reply to a task that keeps the lock until it is read and gives a job
    it brings back to the broker (``release`` at its own priority); if that cannot be done
    the connection is dropped (beanstalkd then returns its jobs).
    """

    lock: threading.Lock
    c: "greenstalk.Client[bytes]"
    pending: bool
    held: dict[int, float]
    closed: bool
    extra: int
    gave_up: float | None
    asked_at: float
    ttr: int
    io_timeout: float
    wake_at: float | None
    _wait_s: int
    _poll_max: float
    _drains: "set[asyncio.Task[None]]"

    def _watch(self, lease_end: float) -> None: ...

    async def receive_async(self, timeout: float) -> Delivery | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.002
        while True:
            got = await self._receive_once(loop, deadline)
            if not isinstance(got, bool):
                return got
            # jobs held, none ready: poll again after a pause, as BeanstalkSub._poll does
            # (without the lock meanwhile, so settles go on)
            left = deadline - loop.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, self._poll_max)

    async def _receive_once(self, loop: asyncio.AbstractEventLoop, deadline: float) -> "Delivery | None | bool":
        if not self.lock.acquire(False):
            raise NotNow("busy")
        kept = False  # the lock handed to a task finishing a cancelled command
        sock = self.c._sock
        ex = Exchange(sock, loop)
        try:
            if self.closed or self.extra:
                raise NotNow("closed, or lease-nudge answers to read first")
            if not self.pending and self.held:
                # a job held that may still be settled: a poll (a waiting reserve would hold up its settles)
                cmd = b"reserve-with-timeout 0\r\n"
                if (sent := ex.write(cmd)) < len(cmd):  # nearly always all at once
                    await ex.send(cmd, sent)
                until = loop.time() + self.io_timeout
                try:
                    line = ex.take_line() if ex.pull(until) else None
                    jid, size = _reserved_head(line or await ex.line(until))
                except (greenstalk.TimedOutError, greenstalk.DeadlineSoonError):
                    return False
                except asyncio.CancelledError:
                    kept = self._finish_later(ex, loop.time() + self.io_timeout)
                    raise
                return await self._body(ex, jid, size, until)
            while True:
                if self.pending:
                    if self.gave_up is not None and deadline - self.gave_up >= self.ttr - min(1.0, self.ttr / 2):
                        # a job it brings may have been reserved nearly a lease ago: BeanstalkSub._stale's case
                        raise NotNow("a stale reserve: the blocking path gives its job back")
                else:
                    cmd = b"reserve-with-timeout %d\r\n" % self._wait_s
                    if (sent := ex.write(cmd)) < len(cmd):  # nearly always all at once
                        await ex.send(cmd, sent)
                    self.pending = True
                    self.gave_up = None
                    self.asked_at = time.monotonic()
                    if self.wake_at is None:
                        self._watch(self.asked_at + self._wait_s + self.ttr)
                overdue = self.asked_at + self._wait_s + self.io_timeout
                try:
                    came = ex.pull(min(deadline, overdue)) or await ex.readable(min(deadline, overdue))
                except asyncio.CancelledError:
                    self.gave_up = time.monotonic()  # left pending, as a receive that timed out
                    raise
                if not came:
                    if deadline < overdue:
                        self.gave_up = time.monotonic()
                        return None
                    raise TimeoutError("beanstalkd did not answer a reserve within the I/O timeout")
                self.pending = False
                self.gave_up = None
                try:
                    line = ex.take_line() or await ex.line(overdue, wait=not ex.started)
                    jid, size = _reserved_head(line)
                except greenstalk.TimedOutError:
                    continue  # a whole wait without a job: wait again
                except greenstalk.DeadlineSoonError:
                    return None
                except asyncio.CancelledError:
                    kept = self._finish_later(ex, overdue)
                    raise
                return await self._body(ex, jid, size, overdue)
        except (NotNow, asyncio.CancelledError, greenstalk.Error):
            raise
        except BaseException:
            drop(sock)  # out of step, timed out or lost: the blocking path meets it and reconnects
            raise
        finally:
            if not kept:
                self.lock.release()

    async def _body(self, ex: Exchange, jid: int, size: int, deadline: float) -> Delivery:
        data = ex.take(size + 2)
        if data is None:
            try:
                data = await ex.exactly(size + 2, deadline)
            except asyncio.CancelledError:
                drop(ex.sock)  # half a job read: beanstalkd returns it when the connection goes
                raise
        if ex.left():
            raise ConnectionError("bytes beyond a reply: the connection is out of step")
        # as BeanstalkSub._reserved: the body as it is (a NUL body after a crash fails to decode, and is dead-lettered)
        now = self.held[jid] = time.monotonic()
        if self.wake_at is None:
            self._watch(now + self.ttr)
        return Delivery(data[:size], greenstalk.Job(jid, data[:size]))

    async def ack_async(self, delivery: Delivery) -> None:
        if not self.lock.acquire(False):
            raise NotNow("busy")
        kept = False
        sock = self.c._sock
        loop = asyncio.get_running_loop()
        try:
            if self.closed or self.pending:
                raise NotNow("closed, or a reserve pending")
            jid = delivery.tag.id
            ex = Exchange(sock, loop)
            cmd = b"delete %d\r\n" % jid
            if (sent := ex.write(cmd)) < len(cmd):  # nearly always all at once
                await ex.send(cmd, sent)
            deadline = loop.time() + self.io_timeout
            try:
                line = (ex.take_line() if ex.pull(deadline) else None) or await ex.line(deadline)
            except asyncio.CancelledError:
                kept = self._finish_later(ex, deadline, jid)
                raise
            self.held.pop(jid, None)
            if ex.left():
                raise ConnectionError("bytes beyond a reply: the connection is out of step")
            if line != b"DELETED\r\n":
                _parse_response(line, b"DELETED")
        except (NotNow, asyncio.CancelledError, greenstalk.Error):
            raise
        except BaseException:
            drop(sock)
            raise
        finally:
            if not kept:
                self.lock.release()

    def _finish_later(self, ex: Exchange, deadline: float, deleted: int | None = None) -> bool:
        """Hand a cancelled command's reply to a task that keeps the lock until it is read."""
        self.pending = False
        task = ex.loop.create_task(self._finish(ex, deadline, deleted))
        self._drains.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._drains.discard)
        return True

    async def _finish(self, ex: Exchange, deadline: float, deleted: int | None) -> None:
        try:
            line = await ex.line(deadline)
            if deleted is not None:  # a delete: done either way (NOT_FOUND: its lease had run out)
                self.held.pop(deleted, None)
            elif line[:9] == b"RESERVED ":
                jid, size = _reserved_head(line)
                await ex.exactly(size + 2, deadline)
                # nobody waits for it any more: back to the broker, at its own priority (as requeue())
                await ex.send(b"stats-job %d\r\n" % jid)
                head = (await ex.line(deadline)).split()
                if head[:1] != [b"OK"]:
                    raise ConnectionError("stats-job of a job given back was refused")
                stats = await ex.exactly(int(head[1]) + 2, deadline)
                pri = next(int(x[4:]) for x in stats.splitlines() if x.startswith(b"pri: "))
                await ex.send(b"release %d %d 0\r\n" % (jid, pri))
                if await ex.line(deadline) != b"RELEASED\r\n":
                    raise ConnectionError("a job given back was not released")
            if ex.left():
                raise ConnectionError("out of step")
        except BaseException:  # also the loop's shutdown cancelling this task
            drop(ex.sock)
        finally:
            self.lock.release()


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
