"""Gearman's binary protocol (http://gearman.org/protocol/), the part mqprimer uses
(the worker side of the gearman backend is :mod:`._gearman_sub`).

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

import socket
import struct
from collections.abc import Callable

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
        self.rest = b""  # what a send_nowait could not write: sent before anything else

    def send_nowait(self, data: bytes) -> bool:
        """Send ``data`` without waiting; ``False``: nothing sent (the socket buffer is full).
        A part that did not fit goes out first with the next send (or :meth:`flush_nowait`)."""
        if self.rest and not self.flush_nowait():
            return False
        try:
            n = self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if n < len(data):
            self.rest = data[n:]
            self.send = self._send_after_rest
        return True

    def flush_nowait(self) -> bool:
        """Write what a :meth:`send_nowait` left over, without waiting; ``True``: nothing left."""
        try:
            n = self.sock.send(self.rest, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        self.rest = self.rest[n:]
        if self.rest:
            return False
        self.send = self.sock.sendall
        return True

    def _send_after_rest(self, data: bytes) -> None:
        rest, self.rest = self.rest, b""
        self.send = self.sock.sendall
        self.sock.sendall(rest + data)

    def fill_nowait(self) -> bool:
        """One ``recv`` that never waits; ``False``: nothing arrived. EOF is a lost connection."""
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if not data:
            raise ConnectionError("gearmand closed the connection")
        self.buf += data
        return True

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
        n = _NARGS.get(cmd)
        if n is None:
            raise ProtocolError(f"unexpected Gearman response type {cmd}")
        while len(buf) < 12 + size:
            self.fill()
        if n == 0:
            del buf[: 12 + size]
            return cmd, []
        args = bytes(buf[12 : 12 + size]).split(b"\0", n - 1)
        if len(args) != n:
            raise ProtocolError(f"Gearman response type {cmd} with {len(args)} arguments, expected {n}")
        del buf[: 12 + size]  # only now: a packet that raised ProtocolError stays, and raises again
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
