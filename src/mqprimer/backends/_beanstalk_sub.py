"""The consumer side of the beanstalk backend: one tube on its own connection.

Reserved jobs belong to the connection that reserved them, so every subscription has its
own. How it waits (a one-second waiting reserve, or polls while it holds jobs), how a job
reserved while nobody was receiving is handled, and the lease nudge for beanstalkd 1.12's
lost TTR expiries (_beanstalk_lease.py) are in docs/backend-beanstalk.md.
"""

from __future__ import annotations

import math
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import greenstalk
from greenstalk import _parse_response

from ..backend import Delivery, Queue, Subscription
from ..errors import MessageTooLarge
from ._beanstalk_asub import AsyncSub
from ._beanstalk_lease import watchdog

Key = tuple[str, int, int]  # (host, port, job id)

_POLL_MAX = 0.02  # longest pause between polls while a consumer holds jobs
_GRACE = 0.001  # how long a poll (receive(0)) holding nothing waits for its reserve's answer
# seconds a waiting reserve stays on the server: a consumer that stops calling receive() can
# take a job no later than this after its last call (the job then waits for that consumer or
# for its TTR); one round trip a second is what an idle consumer costs
_WAIT = 1
# a lease nudge (_beanstalk_lease.py) comes this long after the lease ended by this process's
# clock (beanstalkd's own deadline is earlier: it reserved the job before we read it), or
# this long later again while the subscription is in use (its own command then nudges it)
_NUDGE_LAG = 0.05
_BUSY_RETRY = 0.1


def secs(delay: float | None) -> int:
    """A delay in beanstalkd's whole seconds, rounded up (never early)."""
    return math.ceil(delay) if delay and delay > 0 else 0


class BeanstalkSub(AsyncSub, Subscription):
    """A tube on its own connection: reserved jobs belong to the connection that reserved them.

    The asyncio SPI (``receive_async``, ``ack_async``) is :class:`AsyncSub`'s, on the same
    connection and lock."""

    _wait_s = _WAIT
    _poll_max = _POLL_MAX

    def __init__(self, tube: str, client: "greenstalk.Client[bytes]", host: str, port: int, ttr: int,
                 io_timeout: float, max_size: int, moved: Callable[[Key, Key], None]) -> None:
        self.destination = Queue(tube)
        self.retry_target = Queue(tube)
        self.dead_target = Queue(f"{tube}.dead")
        self.tube = tube
        self.c = client
        self.used = tube
        self.host, self.port, self.ttr = host, port, ttr
        self.io_timeout = io_timeout
        self.moved = moved  # the status map's: a retried or dead-lettered message is a new job
        self.asked_at = 0.0  # when the pending reserve went out
        # a job's TTR is set by its producer; this assumes the producer used the same ?ttr=
        self.delivery_lease = float(ttr)
        self.max_size = max_size
        # the jobs this connection holds, unsettled: id -> when reserved or last touched (monotonic)
        self.held: dict[int, float] = {}
        self.pending = False  # a reserve sent, its answer not read yet
        # the connection is used by the consumer's thread and by the lease watchdog's nudge
        self.lock = threading.Lock()
        self.wake_at: float | None = None  # when the watchdog calls nudge() next (None: not watched)
        self.nudged = 0.0  # every lease that ended before this (monotonic) has had its nudge
        self.extra = 0  # answers to nudges sent while a reserve was pending, still to be read
        self.closed = False
        self.gave_up: float | None = None  # when a receive() last returned with the reserve still pending
        self._drains: set[Any] = set()  # tasks finishing the replies of cancelled asyncio calls (AsyncSub)
        self._ex: Any = None  # AsyncSub's Exchange, reused by its calls on one loop

    # Waiting: a reserve left waiting on the server holds up every later command on its
    # connection (delete, bury) until it answers, and beanstalkd counts reserve timeouts in
    # whole seconds. So a consumer that holds no job sends a reserve of _WAIT seconds and waits
    # for the answer on the socket across receive() calls (no delay when a job comes); one that
    # holds jobs it may still settle polls with reserve-with-timeout 0 and a short pause.
    # greenstalk cannot send a command and read its answer later: the pending reserve uses
    # its socket and reader directly.
    def receive(self, timeout: float | None) -> Delivery | None:
        with self.lock:
            if self.pending:
                return self._await(timeout)
            if self.held:
                return self._poll(timeout)
            if timeout is not None and timeout <= 0:
                # a poll while holding nothing: the waiting reserve that a receive with a timeout
                # (the consumer's next step) sends anyway, with a short grace for its answer; a
                # reserve-with-timeout 0 first would be one more round trip (~0.8 per request of
                # a request/reply service)
                return self._await(_GRACE)
            return self._await(timeout)

    def _watch(self, lease_end: float) -> None:
        """Have the watchdog look at this connection after ``lease_end`` (with the lock held)."""
        self.wake_at = lease_end + _NUDGE_LAG
        watchdog.due(self.wake_at, self)

    def nudge(self, now: float) -> float | None:
        """Send one command if a lease ended on this connection while nobody used it.

        beanstalkd 1.12 can lose the end of a TTR (see _beanstalk_lease.py); a command from
        this connection makes it handle it. Called by the watchdog thread; never raises: a
        connection that fails here is shut down, and the consumer sees it lost on its next call.
        """
        if not self.lock.acquire(blocking=False):
            return now + _BUSY_RETRY  # in use: the command being sent is the nudge
        try:
            if self.closed:
                self.wake_at = None
                return None
            ends = [t + self.ttr for t in self.held.values()]
            if self.pending:  # the job a waiting reserve took, unread, is reserved by then at the latest
                ends.append(self.asked_at + _WAIT + self.ttr)
            ends = [e for e in ends if e > self.nudged]
            if ends and min(ends) + _NUDGE_LAG <= now:
                self.c._sock.sendall(b"list-tube-used\r\n")
                if self.pending:
                    self.extra += 1  # its answer comes after the reserve's
                elif self.c._reader.readline()[:6] != b"USING ":
                    raise ConnectionError("out of step")
                self.nudged = now - _NUDGE_LAG
                ends = [e for e in ends if e > self.nudged]
            self.wake_at = min(ends) + _NUDGE_LAG if ends else None
            return self.wake_at
        except Exception:
            self.wake_at = None
            try:
                self.c._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return None
        finally:
            self.lock.release()

    def _skip_extra(self) -> None:
        while self.extra:
            self.extra -= 1
            if self.c._reader.readline()[:6] != b"USING ":
                raise ConnectionError("a lease nudge was not answered with USING: the connection is out of step")

    def _reserved(self, line: bytes) -> Delivery:
        """The job a ``RESERVED`` reply announces, read off the connection.

        Not greenstalk's reader, which asserts on a body that does not end in CRLF: after a
        SIGKILL, beanstalkd (1.12) can restore the job it was writing with a body of NULs
        (seen in tests/test_beanstalk.py), and an assertion would look like a lost
        connection forever. Such a body is delivered as it is: it fails to decode and is
        dead-lettered, and the consumer goes on.
        """
        if line[:9] == b"RESERVED " and line[-1:] == b"\n":
            head = line[9:].split()
            jid, size = int(head[0]), int(head[1])
        else:  # TIMED_OUT, DEADLINE_SOON, an error, or a line cut short: greenstalk's exceptions
            jid, size = (int(n) for n in _parse_response(line, b"RESERVED"))
        data = self.c._reader.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("unexpected EOF reading a job")
        now = self.held[jid] = time.monotonic()
        if self.wake_at is None:
            self._watch(now + self.ttr)
        return Delivery(data[:size], greenstalk.Job(jid, data[:size]))

    def _poll(self, timeout: float | None) -> Delivery | None:
        c = self.c
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while True:
            c._sock.sendall(b"reserve-with-timeout 0\r\n")  # the hot path: one round trip when a job is ready
            try:
                return self._reserved(c._reader.readline())
            except (greenstalk.TimedOutError, greenstalk.DeadlineSoonError):
                pass  # DEADLINE_SOON: a job we hold is about to time out; nothing new for now
            left = _POLL_MAX if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MAX)

    def _await(self, timeout: float | None) -> Delivery | None:
        c = self.c
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self.pending:
                c._sock.sendall(b"reserve-with-timeout %d\r\n" % _WAIT)
                self.pending = True
                self.gave_up = None
                self.asked_at = time.monotonic()
                if self.wake_at is None:
                    self._watch(self.asked_at + _WAIT + self.ttr)
            # select() is not bounded by the socket's I/O timeout: a hung server would look
            # like an empty tube for ever, so an answer overdue by io_timeout is a lost link
            overdue = max(self.asked_at + _WAIT + self.io_timeout - time.monotonic(), 0.0)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not select.select([c._sock], [], [], overdue if left is None else min(left, overdue))[0]:
                if left is None or overdue <= left:
                    raise TimeoutError("beanstalkd did not answer a reserve within the I/O timeout")
                self.gave_up = time.monotonic()
                return None
            self.pending = False
            try:
                try:
                    delivery = self._reserved(c._reader.readline())
                finally:
                    if self.extra:
                        self._skip_extra()
            except greenstalk.TimedOutError:
                continue  # _WAIT seconds without a job: wait again
            except greenstalk.DeadlineSoonError:
                return None
            if self.gave_up is not None and self._stale(delivery):
                continue
            return delivery

    def _stale(self, delivery: Delivery) -> bool:
        """Give back a job reserved while nobody was receiving, if its TTR may have run out.

        It was reserved after :attr:`gave_up`; once nearly a TTR has passed since, beanstalkd
        may have given it to another consumer, and handing it out would run it twice with
        an ack that fails. Released (when still ours) for whoever reserves next.
        """
        gave_up, self.gave_up = self.gave_up, None
        if gave_up is None or time.monotonic() - gave_up < self.ttr - min(1.0, self.ttr / 2):
            return False
        job = delivery.tag
        self.held.pop(job.id, None)
        try:
            self.c.release(job, int(self.c.stats_job(job)["pri"]), 0)
        except greenstalk.NotFoundError:
            pass  # its TTR ran out: back in the tube already, or with another consumer
        return True

    def _settling(self) -> "greenstalk.Client[bytes]":
        if self.pending:  # never expected: a pending reserve is only sent while no job is held
            raise ConnectionError("a reserve is still pending on this connection")
        return self.c

    def ack(self, delivery: Delivery) -> None:
        jid = delivery.tag.id
        with self.lock:
            try:
                c = self._settling()
                c._sock.sendall(b"delete %d\r\n" % jid)  # greenstalk's delete, one copy and split fewer
                line = c._reader.readline()
                if line != b"DELETED\r\n":
                    _parse_response(line, b"DELETED")
            finally:
                self.held.pop(jid, None)

    def touch(self, delivery: Delivery) -> None:
        with self.lock:
            # NOT_FOUND (the TTR ran out and the job went back, or it is settled) raises
            self._settling().touch(delivery.tag)
            if delivery.tag.id in self.held:  # a new lease: watched like a new reservation
                now = self.held[delivery.tag.id] = time.monotonic()
                if self.wake_at is None:
                    self._watch(now + self.ttr)

    def _stats(self, job: "greenstalk.Job[bytes]") -> tuple[int, int]:
        st = self._settling().stats_job(job)
        return int(st["pri"]), int(st["ttr"])

    def requeue(self, delivery: Delivery) -> None:
        with self.lock:
            try:
                pri, _ = self._stats(delivery.tag)
                self.c.release(delivery.tag, pri, 0)
            finally:
                self.held.pop(delivery.tag.id, None)

    def _put(self, tube: str, payload: bytes, pri: int, delay: int, ttr: int) -> int:
        if tube != self.used:
            self.c.use(tube)
            self.used = tube
        return self.c.put(payload, pri, delay, ttr)

    def retry(self, delivery: Delivery, payload: bytes, delay: float) -> None:
        with self.lock:
            self._retry(delivery, payload, delay)

    def _retry(self, delivery: Delivery, payload: bytes, delay: float) -> None:
        job = delivery.tag
        pri, ttr = self._stats(job)
        if len(payload) > self.max_size:  # the message stays pending: dead_letter() still works
            raise MessageTooLarge(
                f"the retried message is {len(payload):,} bytes with its attempt and error, over the "
                f"beanstalkd server's job size limit of {self.max_size:,} bytes"
            )
        try:
            new = self._put(self.tube, payload, pri, secs(delay), ttr)
            self.c.delete(job)
        finally:
            self.held.pop(job.id, None)
        self.moved((self.host, self.port, job.id), (self.host, self.port, new))

    def dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        with self.lock:
            self._dead_letter(delivery, payload, reason)

    def _dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        job = delivery.tag
        try:
            pri, ttr = self._stats(job)
            if len(payload) > self.max_size:
                self.c.bury(job, pri)  # buried in place, without the reason (see the module doc)
                return
            new = self._put(self.dead_target.name, payload, pri, 0, ttr)
            self.c.bury(self.c.reserve_job(new), pri)
            self.c.delete(job)
        finally:
            self.held.pop(job.id, None)
        self.moved((self.host, self.port, job.id), (self.host, self.port, new))

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.wake_at = None
            try:
                self.c.close()  # beanstalkd returns this connection's reserved jobs to ready at once
            except OSError:
                pass
        watchdog.forget()
