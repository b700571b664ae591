"""The asyncio SPI of :class:`~._beanstalk_sub.BeanstalkSub` (``receive_async``, ``ack_async``).

On the same connection and lock as its blocking methods, with :class:`._beanstalk_aio.Exchange`
for the non-blocking I/O; docs/backend-beanstalk.md ("asyncio") says how and why.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import greenstalk
from greenstalk import _parse_response

from ..backend import Delivery, NotNow
from ._beanstalk_aio import Exchange, drop


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
    _ex: Exchange | None  # reused by the calls on one loop (Exchange.reset); None until the first

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
        ex = self._ex
        if ex is None or ex.sock is not sock or ex.loop is not loop:
            ex = self._exchange(sock, loop)
        else:  # Exchange.reset, inline: this is every call's path
            ex.started = False
            if ex.buf:
                ex.buf.clear()
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
                    jid, size = _reserved_head(ex.quick_line(until) or await ex.line(until))
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
                ex.started = False  # this reply's bytes (after a TIMED_OUT, the next reserve's)
                # the reply line at once when it comes within the idle wait (the common case)
                line = ex.quick_line(deadline if deadline < overdue else overdue)
                if line is None and not ex.started:
                    try:
                        came = await ex.readable(deadline if deadline < overdue else overdue)
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
                    jid, size = _reserved_head(line or await ex.line(overdue, wait=not ex.started))
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
        buf = ex.buf
        if len(buf) == size + 2:  # the common case: the body came with the RESERVED line, and nothing more
            body = bytes(buf[:size])
            buf.clear()
        else:
            try:
                body = (await ex.exactly(size + 2, deadline))[:size]
            except asyncio.CancelledError:
                drop(ex.sock)  # half a job read: beanstalkd returns it when the connection goes
                raise
            if buf:
                raise ConnectionError("bytes beyond a reply: the connection is out of step")
        # as BeanstalkSub._reserved: the body as it is (a NUL body after a crash fails to decode, and is dead-lettered)
        now = self.held[jid] = time.monotonic()
        if self.wake_at is None:
            self._watch(now + self.ttr)
        return Delivery(body, greenstalk.Job(jid, body))

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
            ex = self._ex
            if ex is None or ex.sock is not sock or ex.loop is not loop:
                ex = self._exchange(sock, loop)
            else:  # Exchange.reset, inline: this is every call's path
                ex.started = False
                if ex.buf:
                    ex.buf.clear()
            cmd = b"delete %d\r\n" % jid
            if (sent := ex.write(cmd)) < len(cmd):  # nearly always all at once
                await ex.send(cmd, sent)
            deadline = loop.time() + self.io_timeout
            line = ex.quick_line(deadline)  # the reply within the idle wait: no coroutine step
            if line is None:
                try:
                    line = await ex.line(deadline)
                except asyncio.CancelledError:
                    kept = self._finish_later(ex, deadline, jid)
                    raise
            self.held.pop(jid, None)
            if ex.buf:
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

    def _exchange(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> Exchange:
        """This subscription's :class:`Exchange` for ``sock`` on ``loop`` (under the lock)."""
        ex = self._ex
        if ex is None or ex.sock is not sock or ex.loop is not loop:
            ex = self._ex = Exchange(sock, loop)
            return ex
        return ex.reset()

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
