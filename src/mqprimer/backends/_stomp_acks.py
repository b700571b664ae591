"""A STOMP link's ACK writer: batched ACKs that a consumer gives without ever waiting.

One write per ACK costs more than the ACK itself (a system call and a GIL hand-off to
stomp.py's receiver thread each), so ACKs are written together: when :data:`ACK_BATCH` are
waiting, with the link's next write of any frame, whenever a consumer is about to wait for a
message, before the link closes, and at the latest :data:`ACK_LINGER` after the first one.

:meth:`AckWriter.add` never waits, whoever calls it: the asyncio twin runs it on its event
loop (``Capabilities.nowait``), where a broker that stopped reading (a full socket buffer)
or a producer's SEND holding the socket must not hold the loop. A full batch is written
with ``MSG_DONTWAIT`` only if both the link's write lock and stomp.py's socket lock are free
at once; whatever the socket did not take then (a partial write, or nothing) goes to the
flusher thread, which writes it with a blocking ``sendall``. A partial write's rest keeps
both locks until the flusher has written it (a ``threading.Lock`` may be released by another
thread), so no other frame, nor a stomp.py heart-beat, can land inside a half-written ACK.

Every other write of the link (:meth:`AckWriter.write`) carries the waiting ACKs in front of
its frames under the same lock: an ACK given before a NACK, UNSUBSCRIBE or DISCONNECT is on
the wire before it. An ACK lost with its connection means a redelivery: at-least-once holds.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from stomp.exception import NotConnectedException

from ..backend import NotNow

ACK_BATCH = 32  # ACKs written together at most
ACK_LINGER = 0.01  # seconds an ACK may wait for others while the consumer is busy


class AckWriter:
    """The waiting ACKs of one link, and the lock every write of that link takes."""

    def __init__(self, transport: Callable[[], Any], alive: Callable[[], bool]) -> None:
        self._transport = transport  # stomp.py's transport (the socket changes on reconnect)
        self._alive = alive
        self.lock = threading.Lock()  # held by whoever writes to the socket (ACKs first)
        self._cond = threading.Condition()  # guards the fields below; never held across I/O
        self._pending: list[bytes] = []
        self._tail: tuple[Any, Any, bytes] | None = None  # (socket, its lock, bytes): a partial write's rest
        self._stopped = False  # no flusher any more (closed, or the connection is gone)
        # the flusher waits for a first ACK (not lingering, not writing): only then does an ACK wake
        # it; lingering, it writes at the linger's end whatever is waiting by then
        self._idle = False
        self._added = 0  # ACKs queued so far (the flusher lingers on while they keep coming)
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Start the flusher (from a thread: ``Thread.start`` waits for it to run)."""
        with self._cond:
            if self._thread is not None or self._stopped:
                return
            self._thread = threading.Thread(target=self._run, name="mqprimer-stomp-acks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """No more flushing (the link is closing: its owner wrote the waiting ACKs already)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def add(self, frame: bytes) -> None:
        """Queue one encoded ACK; never waits and never raises."""
        with self._cond:
            self._pending.append(frame)
            self._added += 1
            n = len(self._pending)
            if n == 1 and self._idle:
                self._cond.notify()  # the flusher's linger starts
        if n >= ACK_BATCH:
            self.write_nowait()

    def write(self, data: bytes, send: Callable[[bytes], None], timeout: float = -1) -> bool:
        """``send`` the waiting ACKs and then ``data`` in one call, under the write lock (blocking);
        ``False``: another write held the lock for ``timeout`` seconds (a broker that stopped
        reading), nothing was sent."""
        if not self.lock.acquire(timeout=timeout):
            return False
        try:
            with self._cond:
                acks, self._pending = self._pending, []
            if acks:
                acks.append(data)
                data = b"".join(acks)
            if data:
                send(data)
        finally:
            self.lock.release()
        return True

    def write_within(self, data: bytes, seconds: float) -> bool:
        """:meth:`write` for a close: ``False`` if the waiting ACKs and ``data`` could not all
        go out within ``seconds`` (a broker that stopped reading); the stream may then end
        inside a frame, so the caller closes the socket without another frame."""
        deadline = time.monotonic() + seconds
        t = self._transport()
        sem = getattr(t, "_Transport__socket_semaphore", None)
        sock = getattr(t, "socket", None)
        if sem is None or sock is None or not getattr(t, "blocking", False):
            return self.write(data, _sender(t), seconds)  # TLS: a queue put, stomp.py's thread writes
        if not self.lock.acquire(timeout=seconds):
            return False
        try:
            if not sem.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
            try:
                with self._cond:
                    acks, self._pending = self._pending, []
                rest = memoryview(b"".join([*acks, data]))
                while rest:
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([], [sock], [], left)[1]:
                        return False
                    try:
                        rest = rest[sock.send(rest, socket.MSG_DONTWAIT):]
                    except (BlockingIOError, InterruptedError):
                        continue
                return True
            finally:
                sem.release()
        finally:
            self.lock.release()

    def send_nowait(self, sock: Any, sem: Any, frame: bytes) -> memoryview | None:
        """The waiting ACKs and ``frame`` written with ``MSG_DONTWAIT`` (the asyncio twin's SEND,
        _stomp_aio.py); ``None``: all written. Else the rest, both locks still held: the caller
        writes it and releases them. Raises ``NotNow`` when nothing was written (a lock busy,
        the socket full), ``OSError`` when the connection is gone."""
        if not self.lock.acquire(False):
            raise NotNow("a write is under way")
        if not sem.acquire(False):
            self.lock.release()
            raise NotNow("the socket is busy")
        with self._cond:
            acks, self._pending = self._pending, []
        data = b"".join([*acks, frame]) if acks else frame
        try:
            sent = sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sem.release()
            self.lock.release()
            raise
        if sent < len(data) and sent > 0:
            return memoryview(data)[sent:]
        if sent == 0 and acks:
            with self._cond:
                self._pending[:0] = acks  # nothing written: they stay first in line
        sem.release()
        self.lock.release()
        if sent == 0:
            raise NotNow("the socket is full")
        return None

    def write_nowait(self) -> None:
        """Write the waiting ACKs without ever waiting: with ``MSG_DONTWAIT`` when both locks
        are free at once, else (or for what the socket did not take) by the flusher thread.
        A thread that reads the socket (``_stomp_wire.Reader.lead``) writes its ACKs this way:
        blocked in a write while nobody reads, it could wait for a broker that waits for it."""
        if not self.lock.acquire(False):
            self._kick()  # another write is under way; the flusher writes these after it
            return
        t = self._transport()
        sem = getattr(t, "_Transport__socket_semaphore", None)  # stomp.py's: its heart-beats take it
        sock = getattr(t, "socket", None)
        if (sem is None or sock is None or not getattr(t, "blocking", False) or sock.gettimeout() is not None
                or not sem.acquire(False)):
            self.lock.release()  # TLS (stomp.py's I/O thread writes) or a busy socket: the flusher's job
            self._kick()
            return
        with self._cond:
            acks, self._pending = self._pending, []
        data = b"".join(acks)
        try:
            sent = sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except Exception:
            sent = len(data)  # the connection is gone and these ACKs with it: the broker redelivers
        if 0 < sent < len(data):
            with self._cond:
                if not self._stopped and self._thread is not None:
                    self._tail = (sock, sem, data[sent:])  # the flusher writes it, then releases both locks
                    self._cond.notify_all()
                    return
        elif sent == 0:
            with self._cond:
                self._pending[:0] = acks  # nothing written: they stay first in line
        sem.release()
        self.lock.release()
        if sent == 0:
            self._kick()

    def _kick(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        cond = self._cond
        added = 0
        while True:
            with cond:
                if self._added == added:  # no ACK in the last linger: wait for one
                    self._idle = True
                    while self._tail is None and not self._pending and not self._stopped and self._alive():
                        if cond.wait(1.0):
                            # woken: linger even if the ACK's consumer has written it meanwhile (it
                            # does before it waits), so a busy consumer's next ACKs do not wake
                            # this thread one by one (a wake-up per ACK, most of them for nothing)
                            break
                    self._idle = False
                # while ACKs keep coming, one wake-up per linger, not one per ACK
                added = self._added
                if self._tail is None and len(self._pending) < ACK_BATCH and not self._stopped and self._alive():
                    cond.wait(ACK_LINGER)  # let others join the first (a full batch or a tail wakes it early)
                tail, self._tail = self._tail, None
                if tail is None and (self._stopped or not self._alive()):
                    self._stopped = True
                    self._pending.clear()  # closed (the owner wrote them) or lost (the broker redelivers)
                    return
                if tail is None and not self._pending:
                    continue  # written by their consumer meanwhile
            if tail is not None:
                sock, sem, rest = tail
                try:
                    sock.sendall(rest)
                except Exception:
                    pass  # the connection is gone; its reader says so
                finally:
                    sem.release()
                    self.lock.release()
                continue
            try:
                t = self._transport()
                self.write(b"", _sender(t))
            except Exception:
                pass  # the connection is gone: the next turn sees it


def _sender(t: Any) -> Callable[[bytes], None]:
    """How bytes reach the wire: stomp.py's ``send`` (its socket lock), or for TLS the queue its
    I/O thread writes from."""
    if getattr(t, "blocking", True):
        return t.send  # type: ignore[no-any-return]
    q = getattr(t, "send_queue", None)
    if q is None:  # torn down, the disconnect notification still on its way
        raise NotConnectedException()
    return q.put  # type: ignore[no-any-return]
