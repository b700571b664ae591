"""The output side of an AMQP :class:`~._amqp_link.Link`: who writes to the socket, and when.

pika writes from the I/O thread only: a frame is appended to the transport's buffer and sent
when the loop next sees the socket writable. Two shortcuts, both for plaintext connections
(TLS has its own state machine and is left to the loop):

- :meth:`Output.coalesce` (I/O thread, after each hand-off): join what is buffered and send
  it at once, in one ``send()``, not on the loop's next turn (one ``epoll_wait`` less).
- :meth:`Output.direct` (any thread): a user thread that finds the output idle (nothing
  buffered, nobody writing, no hand-off pending) sends its own frames (a request, a reply,
  an ack) itself, instead of waking the I/O thread to do it. A sequential request/reply round trip then costs two
  thread wake-ups instead of four (docs/request-reply.md). Frames are marshalled with pika's
  own ``pika.frame`` classes; pika's channel objects are not touched (their state is read).

Why this is safe: every ``send()`` on the socket, the I/O thread's too, happens under
:attr:`Output.lock`, and a direct write happens only when pika's buffer is empty, so bytes
never land inside another writer's frame. A direct write the socket takes only in part keeps
its rest in :attr:`Output.rest`, which the I/O thread puts at the front of pika's buffer
(under the lock) before it sends anything else. Callers say, under the lock, whether their
channel may take the frames now (:meth:`direct`'s ``build`` returns ``None`` if not): a
channel closing, or one with hand-offs still queued that must go first. This reaches into
pika 1.x internals (``_tx_buffers``, ``_on_socket_writable``); without them ``direct``
always declines and everything goes through the I/O thread, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pika import frame, spec

try:  # pika 1.x's plaintext transport
    from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport as _PLAIN
except ImportError:  # pragma: no cover - frames leave when the loop sends them
    _PLAIN = None


class Output:
    """The socket's writers, serialised (see the module doc). Made on the I/O thread's
    connection right after it connected, before the loop runs."""

    def __init__(self, conn: Any, wake: Callable[[Callable[[], None]], None], woken: Callable[[], bool]) -> None:
        self.conn = conn
        self._woken = woken  # a hand-off to the I/O thread is pending: it runs (and sends) anyway
        self.lock = threading.Lock()  # held around every send() on the socket
        self.rest: bytes | None = None  # a direct write's unsent tail (goes out first)
        self.partial = 0  # direct writes the socket took only in part (tests read it)
        self._wake = wake  # Link.submit: run a function on the I/O thread
        self.transport: Any = getattr(conn, "_transport", None)
        self.plain = _PLAIN is not None and type(self.transport) is _PLAIN and hasattr(self.transport, "_sock")
        if self.plain:
            t: Any = self.transport
            self._send_buffered: Callable[[], None] = t._on_socket_writable
            # pika registers this attribute as the socket's writer each time its buffer fills
            t._on_socket_writable = self._writable
            if t._tx_buffers:  # a writer registered before: make it the locked one
                t._nbio.set_writer(t._sock.fileno(), self._writable)

    # -- I/O thread ------------------------------------------------------------------------
    def _take_rest(self) -> None:
        rest, self.rest = self.rest, None
        if rest:
            t = self.transport
            t._tx_buffers.appendleft(rest)
            t._tx_buffered_byte_count += len(rest)  # pika's count: mutated on the I/O thread only

    def _writable(self) -> None:
        with self.lock:
            self._take_rest()
            if self.transport._tx_buffers:  # pika asserts there is something to send
                self._send_buffered()

    def coalesce(self) -> None:
        """Join pika's pending output into one buffer and send it now, in one ``send()``
        (what the socket does not take waits for writability, as pika does)."""
        t = self.transport
        bufs = getattr(t, "_tx_buffers", None)
        if bufs is None or not (bufs or self.rest):
            return
        with self.lock:
            self._take_rest()
            if len(bufs) > 1:
                data = b"".join(bufs)
                bufs.clear()
                bufs.append(data)
            if self.plain and bufs:
                self._send_buffered()  # pika's own handler: it logs and aborts on a socket error
                if bufs and t._state == t._STATE_ACTIVE:  # a direct write's rest was never registered
                    t._nbio.set_writer(t._sock.fileno(), t._on_socket_writable)

    # -- any thread --------------------------------------------------------------------------
    def direct(self, build: Callable[[], bytes | None]) -> bool:
        """Send ``build()``'s bytes from this thread, now, if the output is idle; ``False``
        (nothing sent) if it is busy, or ``build`` returned ``None``: hand them to the I/O
        thread then. ``build`` runs under the lock, so what it checks holds until they leave."""
        # with a hand-off already pending, joining it costs no wake-up and shares its send()
        # (many consumers' acks on one connection, many callers' requests): only a thread that
        # would wake the I/O thread for itself writes instead
        if not self.plain or self._woken() or not self.lock.acquire(blocking=False):
            return False
        try:
            t = self.transport
            if t._tx_buffers or self.rest is not None or t._state != t._STATE_ACTIVE:
                return False
            data = build()
            if data is None:
                return False
            try:
                sent = t._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0  # all of it is the rest: the I/O thread sends it when the socket drains
            except OSError:
                return False  # the connection is failing: the I/O thread reports it
            if sent < len(data):
                self.rest = data[sent:]
                self.partial += 1
                try:
                    self._wake(self.coalesce)
                except Exception:
                    pass  # the connection is gone: nothing to finish
            return True
        finally:
            self.lock.release()


def publish_frames(channel: int, exchange: str, key: str, body: bytes, props: Any, body_max: int) -> bytes:
    """A ``basic.publish`` with its header and body frames, marshalled as pika would."""
    parts = [frame.Method(channel, spec.Basic.Publish(exchange=exchange, routing_key=key)).marshal(),
             frame.Header(channel, len(body), props).marshal()]
    for i in range(0, len(body), body_max):
        parts.append(frame.Body(channel, body[i:i + body_max]).marshal())
    return b"".join(parts)


def ack_frame(channel: int, tag: int) -> bytes:
    data: bytes = frame.Method(channel, spec.Basic.Ack(delivery_tag=tag)).marshal()
    return data
