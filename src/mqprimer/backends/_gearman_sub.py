"""The worker side of the gearman backend: one function on its own worker connection.

Blocking calls for the portable layer; a poll that never waits (``receive_nowait``) and an
ack awaited on the event loop (``ack_async``, :mod:`._gearman_aio`) for the asyncio twin.
"""

from __future__ import annotations

import asyncio
import math
import select
import time
from collections import deque

from ..backend import Delivery, NotNow, Queue, Subscription
from ..errors import StateError, UnsupportedError
from . import _gearman_aio as aio_io
from ._gearman_proto import (
    ECHO_REQ,
    GRAB_JOB_UNIQ,
    JOB_ASSIGN_UNIQ,
    NO_JOB,
    NOOP,
    PRE_SLEEP,
    SUBMIT_JOB_BG,
    WORK_COMPLETE,
    GearmanError,
    Link,
    other_unique,
    packet,
)

_FULL_PAUSE = 0.02  # a consumer holding `prefetch` jobs looks again after this long
_BURST_MAX = 256  # grabs per write while jobs keep coming


class GearmanSub(Subscription):
    """One function on its own worker connection: held jobs belong to that connection.

    Replies are counted: every GRAB_JOB_UNIQ, ECHO_REQ and SUBMIT gets exactly one answer,
    in order; NOOP comes unasked after PRE_SLEEP; ERROR answers a refused WORK_COMPLETE.
    """

    def __init__(self, fn: bytes, link: Link, prefetch: int, held: set[tuple[bytes, bytes]],
                 lease: float | None) -> None:
        name = fn.decode()
        self.destination = Queue(name)
        self.retry_target = Queue(name)
        self.dead_target = Queue(f"{name}.dead")
        self.delivery_lease = lease
        self.fn = fn
        self.link = link
        self.prefetch = prefetch
        self.shared_held = held  # the backend's (function, unique) set of held jobs
        self.ready: deque[Delivery] = deque()  # grabbed, not handed out yet
        self.mine: dict[bytes, bytes] = {}  # handle -> unique of the jobs handed out, unsettled
        self.sent = 0  # requests that get an answer
        self.answered = 0
        self.empty = False  # the last grab found nothing: sleep until woken
        self.sleeping = False  # PRE_SLEEP sent, no NOOP since
        self.regrab_at = 0.0  # when a sleeping consumer grabs anyway (delayed jobs), epoch s
        self.burst = 1
        self.errors: list[GearmanError] = []
        self.forget_before = 0  # an ERROR read while fewer answers came is a cancelled ack_async's
        # an ack_async is out: the portable layer's lock is an RLock, which another task on the
        # loop would get too; receive_nowait and ack_async keep off the connection meanwhile
        self.aio_busy = False
        self.replies: dict[bytes, bytes] = {}  # handle -> reply, sent as the job's WORK_COMPLETE data
        # when the oldest unanswered request went out (or the last answer came): the answers
        # are awaited with select(), which the socket's I/O timeout does not bound, so a hung
        # gearmand would otherwise look like an empty queue forever
        self.heard = time.monotonic()

    # -- the answers -----------------------------------------------------------------
    def _take(self) -> None:
        """Read and dispatch one packet (blocking up to the I/O timeout)."""
        try:
            cmd, args = self.link.read()
        except GearmanError as exc:  # a refused WORK_COMPLETE: no request is answered by it
            if self.answered >= self.forget_before:  # else: a cancelled ack_async's, nobody to tell
                self.errors.append(exc)
            return
        finally:
            self.heard = time.monotonic()
        if cmd == JOB_ASSIGN_UNIQ:
            self.answered += 1
            # the handle as correlation id: a reply to a foreground job (request/reply) goes
            # back as its WORK_COMPLETE, on this connection (GearmanBackend.send_reply)
            self.ready.append(Delivery(args[3], (args[0], args[2]), correlation_id=args[0].decode()))
        elif cmd == NO_JOB:
            self.answered += 1
            self.empty = True
            self.burst = 1
        elif cmd == NOOP:
            self.sleeping = self.empty = False
        else:  # ECHO_RES, JOB_CREATED
            self.answered += 1

    def _settle_to(self, target: int) -> None:
        """Read until the ``target``-th request is answered; raise an ERROR seen on the way."""
        while self.answered < target:
            self._take()
        if self.errors:
            err, self.errors = self.errors[0], []
            raise err

    def _wait(self, seconds: float) -> bool:
        """Data to read within ``seconds`` (a buffered packet counts)."""
        if self.link.buffered():
            return True
        return bool(select.select([self.link.sock], [], [], max(seconds, 0.0))[0])

    # -- receiving -------------------------------------------------------------------
    def _hand_out(self) -> Delivery:
        d = self.ready.popleft()
        handle, unique = d.tag
        self.mine[handle] = unique
        self.shared_held.add((self.fn, unique))
        return d

    def receive_nowait(self) -> Delivery | None:
        """``receive(0.0)``, which never waits (``"poll"`` in ``Capabilities.nowait``): a job
        grabbed already, else the answers already in the socket's buffer; a grab (or
        ``PRE_SLEEP``) is written only if the socket takes it at once. It raises (a lost
        connection, a hung gearmand) before it has taken anything."""
        link = self.link
        while not self.ready:
            if self.aio_busy:
                return None
            if link.buffered():
                self._take()
            elif link.fill_nowait():
                continue
            elif link.rest and not link.flush_nowait():
                return None
            elif self.answered < self.sent:
                if time.monotonic() - self.heard > link.io_timeout:
                    raise TimeoutError("gearmand did not answer within the I/O timeout")
                return None
            elif len(self.mine) >= self.prefetch:
                return None
            elif not self.empty:
                n = min(self.prefetch - len(self.mine), self.burst)
                if not link.send_nowait(_GRAB * n):
                    return None
                self.heard = time.monotonic()
                self.sent += n
                self.burst = min(self.burst * 2, _BURST_MAX)
            elif not self.sleeping:
                if not link.send_nowait(_PRE_SLEEP):
                    return None
                self.sleeping = True
                self.regrab_at = math.floor(time.time()) + 1.005
                return None
            elif time.time() >= self.regrab_at:
                self.empty = self.sleeping = False
            else:
                return None
        return self._hand_out()

    def receive(self, timeout: float | None) -> Delivery | None:
        if timeout is not None and timeout <= 0:
            return self.receive_nowait()
        if self.link.rest:  # a grab a poll could not write whole: its answer needs the rest
            self.link.send(b"")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.ready:
                return self._hand_out()
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if self.answered < self.sent or self.link.buffered():
                overdue = self.heard + self.link.io_timeout - time.monotonic()
                if not self._wait(min(left, overdue)):
                    if overdue <= left:
                        raise TimeoutError("gearmand did not answer within the I/O timeout")
                    return None
                self._take()
                while self.link.buffered():
                    self._take()
                continue
            room = self.prefetch - len(self.mine)
            if room <= 0:  # holding prefetch jobs: nothing to ask for until one is settled
                if left <= 0:
                    return None
                time.sleep(min(left, _FULL_PAUSE))
                continue
            if not self.empty:
                n = min(room, self.burst)
                if self.answered == self.sent:
                    self.heard = time.monotonic()
                self.link.send(_GRAB * n)
                self.sent += n
                self.burst = min(self.burst * 2, _BURST_MAX)
                continue
            # gearmand wakes no worker when a delayed job falls due (due times are whole
            # seconds): an idle consumer asks again just after each whole second
            now = time.time()
            if not self.sleeping:
                self.link.send(_PRE_SLEEP)
                self.sleeping = True
                self.regrab_at = math.floor(now) + 1.005
            elif now >= self.regrab_at:
                self.empty = self.sleeping = False
                continue
            tick = self.regrab_at - now
            if self._wait(min(left, tick)):
                self._take()
            elif left < tick:
                return None

    # -- settling --------------------------------------------------------------------
    def _confirming(self) -> bytes:
        """The request that confirms what was just sent: a grab if one is due anyway."""
        self.sent += 1
        if not self.empty and len(self.mine) + len(self.ready) + (self.sent - 1 - self.answered) < self.prefetch:
            return _GRAB
        return _ECHO

    def reply(self, handle: bytes, payload: bytes) -> bool:
        """Keep ``payload`` for the WORK_COMPLETE that acks job ``handle``, if this
        subscription holds it (a job completes once: a second reply is refused)."""
        if handle not in self.mine:
            return False
        if handle in self.replies:
            raise StateError("this gearman job was answered already: gearmand completes a job once")
        self.replies[handle] = payload
        return True

    def _release(self, handle: bytes) -> None:
        self.replies.pop(handle, None)
        unique = self.mine.pop(handle, None)
        if unique is not None:
            self.shared_held.discard((self.fn, unique))

    def ack(self, delivery: Delivery) -> None:
        handle = delivery.tag[0]
        try:
            reply = self.replies.pop(handle, b"") if self.replies else b""
            self.link.send(packet(WORK_COMPLETE, handle, reply) + self._confirming())
            self._settle_to(self.sent)
        finally:
            self._release(handle)

    async def ack_async(self, delivery: Delivery) -> None:
        """:meth:`ack` on the event loop (the portable layer's lock held): the same bytes, and
        the answer read as it comes (:mod:`._gearman_aio`). Cancelled while the answer is out,
        the ack still completes: the answers are counted, so the next call reads it in step
        (an ERROR it brings is dropped: its caller is gone). Timed out or lost: the connection
        is dropped, and the twin's repeat on a thread meets that."""
        if self.aio_busy:
            raise NotNow("another ack is out on the loop")
        handle = delivery.tag[0]
        link = self.link
        self.aio_busy = True
        try:
            reply = self.replies.pop(handle, b"") if self.replies else b""
            await aio_io.send(link, packet(WORK_COMPLETE, handle, reply) + self._confirming())
            target = self.sent
            loop = asyncio.get_running_loop()
            deadline = loop.time() + link.io_timeout
            try:
                while self.answered < target:
                    if link.buffered():
                        self._take()
                    else:
                        await aio_io.fill(link, deadline)
            except asyncio.CancelledError:
                self.forget_before = target
                raise
            if self.errors:
                err, self.errors = self.errors[0], []
                raise err
        except (GearmanError, asyncio.CancelledError):
            raise
        except BaseException:
            aio_io.drop(link)  # out of step, timed out or lost
            raise
        finally:
            self.aio_busy = False
            self._release(handle)

    def requeue(self, delivery: Delivery) -> None:
        # a worker cannot give a job back (WORK_FAIL ends it): a copy, then the original done
        handle, unique = delivery.tag
        try:
            self.link.send(packet(SUBMIT_JOB_BG, self.fn, other_unique(unique), delivery.payload))
            self.sent += 1
            self._settle_to(self.sent)
            self.link.send(packet(WORK_COMPLETE, handle, b"") + self._confirming())
            self._settle_to(self.sent)
        finally:
            self._release(handle)

    def touch(self, delivery: Delivery) -> None:
        if self.delivery_lease is not None:
            raise UnsupportedError(
                "the gearman backend cannot extend a job's timeout (?timeout= is CAN_DO_TIMEOUT, fixed "
                "per worker): raise the timeout in the URL instead"
            )

    def close(self) -> None:
        for handle in list(self.mine):
            self._release(handle)
        self.link.close()  # gearmand gives this connection's jobs back at once


_GRAB = packet(GRAB_JOB_UNIQ)
_ECHO = packet(ECHO_REQ, b"")
_PRE_SLEEP = packet(PRE_SLEEP)
