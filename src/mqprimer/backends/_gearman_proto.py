"""Gearman's binary protocol (http://gearman.org/protocol/), the part mqprimer uses, and
the worker side of the gearman backend (:class:`GearmanSub`).

Why not pygearman, the maintained Python client: its worker is a polling select() loop
that grabs one job at a time and cannot hold several unsettled jobs (prefetch), nor
settle a job later from another call; its client waits in the same loop for every
``JOB_CREATED``, cannot pipeline a batch of submits into one write, and a late
``STATUS_RES`` raises ``KeyError`` in the next unrelated call (its handle map is a
weak-value dict that has already dropped the request). The protocol itself is small:
12-byte headers, NUL-separated arguments, every request answered in order on its
connection. Speaking it here costs ~150 lines and lets a worker sleep on the socket
(``PRE_SLEEP``, woken by ``NOOP``) with no polling. Benchmarks still compare against
pygearman (benchmarks/bench_gearman.py).
"""

from __future__ import annotations

import math
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

from ..backend import Delivery, Queue, Subscription
from ..errors import StateError, UnsupportedError

CAN_DO = 1
PRE_SLEEP = 4
NOOP = 6
SUBMIT_JOB = 7
JOB_CREATED = 8
NO_JOB = 10
WORK_STATUS = 12
WORK_COMPLETE = 13
WORK_FAIL = 14
WORK_EXCEPTION = 25
WORK_DATA = 28
WORK_WARNING = 29
ECHO_REQ = 16
ECHO_RES = 17
SUBMIT_JOB_BG = 18
ERROR = 19
CAN_DO_TIMEOUT = 23
GRAB_JOB_UNIQ = 30
JOB_ASSIGN_UNIQ = 31
SUBMIT_JOB_HIGH_BG = 32
SUBMIT_JOB_LOW_BG = 34
SUBMIT_JOB_EPOCH = 36
GET_STATUS_UNIQUE = 41
STATUS_RES_UNIQUE = 42

# arguments per response packet: the last one may contain NULs (job data)
_NARGS = {JOB_CREATED: 1, NO_JOB: 0, NOOP: 0, ECHO_RES: 1, ERROR: 2, JOB_ASSIGN_UNIQ: 4, STATUS_RES_UNIQUE: 6,
          # what a foreground job's client hears (request/reply)
          WORK_COMPLETE: 2, WORK_FAIL: 1, WORK_EXCEPTION: 2, WORK_DATA: 2, WORK_WARNING: 2, WORK_STATUS: 3}
_HEADER = struct.Struct(">4sII")
_REQ = b"\0REQ"
_RES = b"\0RES"
_FULL_PAUSE = 0.02  # a consumer holding `prefetch` jobs looks again after this long
_BURST_MAX = 256  # grabs per write while jobs keep coming
MAX_UNIQUE = 63  # gearmand 1.1.20 accepts 64 bytes but hands out only 63 of them (measured)


class GearmanError(Exception):
    """The server answered ``ERROR code text`` (the connection is still usable)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"gearmand error {code}: {text}")
        self.code = code


class ProtocolError(ConnectionError):
    """The byte stream is not Gearman: the connection cannot be trusted any more."""


def packet(cmd: int, *args: bytes) -> bytes:
    body = b"\0".join(args)
    return _HEADER.pack(_REQ, cmd, len(body)) + body


class Link:
    """One TCP connection to gearmand: buffered packet reads, blocking with a timeout."""

    def __init__(self, host: str, port: int, connect_timeout: float, io_timeout: float) -> None:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            # kernel-side timeouts on a blocking socket: Python's own socket timeout adds a
            # poll() before every call (the beanstalk driver measured ~0.6x throughput)
            sock.settimeout(None)
            tv = struct.pack("ll", int(io_timeout), int(io_timeout % 1 * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.io_timeout = io_timeout
        self.buf = bytearray()
        self.send: Callable[[bytes], None] = sock.sendall

    def buffered(self) -> bool:
        """A whole packet is already buffered (no read needed to return it)."""
        buf = self.buf
        return len(buf) >= 12 and len(buf) >= 12 + int.from_bytes(buf[8:12], "big")

    def fill(self) -> None:
        """One ``recv``: blocks up to the I/O timeout; EOF is a lost connection."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            raise TimeoutError("gearmand did not answer within the I/O timeout") from None
        if not data:
            raise ConnectionError("gearmand closed the connection")
        self.buf += data

    def read(self) -> tuple[int, list[bytes]]:
        """The next response packet: (command, arguments)."""
        buf = self.buf
        while len(buf) < 12:
            self.fill()
        magic, cmd, size = _HEADER.unpack_from(buf)
        if magic != _RES:
            raise ProtocolError(f"not a Gearman response (magic {bytes(magic)!r})")
        while len(buf) < 12 + size:
            self.fill()
        body = bytes(buf[12 : 12 + size])
        del buf[: 12 + size]
        n = _NARGS.get(cmd)
        if n is None:
            raise ProtocolError(f"unexpected Gearman response type {cmd}")
        if n == 0:
            return cmd, []
        args = body.split(b"\0", n - 1)
        if len(args) != n:
            raise ProtocolError(f"Gearman response type {cmd} with {len(args)} arguments, expected {n}")
        if cmd == ERROR:
            raise GearmanError(args[0].decode("ascii", "replace"), args[1].decode("utf-8", "replace")[:200])
        return cmd, args

    def text(self, command: bytes) -> bytes:
        """One text admin command (``version``, ``getpid``): its first answer line."""
        if self.buf:
            raise ProtocolError("a text command with binary replies still unread")
        self.send(command + b"\n")
        while b"\n" not in self.buf:
            self.fill()
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return line

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def other_unique(u: bytes) -> bytes:
    """The unique for a copy made while the job with unique ``u`` is still held (a retry,
    a requeue): gearmand would merge a job with the same function and unique into it."""
    return u[:-1] if u.endswith(b"~") else u + b"~"


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
    def receive(self, timeout: float | None) -> Delivery | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.ready:
                d = self.ready.popleft()
                handle, unique = d.tag
                self.mine[handle] = unique
                self.shared_held.add((self.fn, unique))
                return d
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
