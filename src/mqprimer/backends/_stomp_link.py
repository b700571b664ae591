"""One STOMP 1.2 connection (stomp.py) with receipts, per-subscription inboxes and loss detection.

stomp.py delivers frames on its own receiver thread and never reconnects. A :class:`Link`
turns that into calls that either complete or raise: every wait (CONNECTED, receipts,
an inbox) also ends when the connection drops or the broker sends ERROR, so a lost
broker surfaces as an exception from publish / receive / ack, never as a hang.

Subscriptions share a link: each registers its SUBSCRIBE ids with an inbox of its own, to
which the receiver thread routes MESSAGEs by their ``subscription`` header. An ERROR naming a
subscription (RabbitMQ's "Server cancelled subscription": its queue was deleted) ends that
one only; any other ERROR ends the link for everyone (the broker closes it after an ERROR).

The receiver thread is stomp.py's, but it reads frames with a :class:`~._stomp_wire.Reader`:
each socket read's MESSAGEs reach their inboxes as one list (_stomp_wire.py says why); every
other frame still goes through stomp.py (receipts, CONNECTED, ERROR, heartbeats).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import stomp
from stomp.exception import ConnectFailedException, NotConnectedException, StompException

from ._stomp_acks import AckWriter, _sender
from ._stomp_wire import Inbox, Reader, encode_ack, encode_frame

# stomp.py logs every frame at DEBUG, bodies and the CONNECT passcode included: its logger
# is held at INFO whenever a link is made, so neither ever reaches the logs.
_stomp_log = logging.getLogger("stomp.py")


def _silence_stomp_py() -> None:
    if _stomp_log.level < logging.INFO:  # NOTSET (0) would inherit DEBUG from the root
        _stomp_log.setLevel(logging.INFO)


_silence_stomp_py()

CONNECT_TIMEOUT = 15.0
RECEIPT_TIMEOUT = 30.0
_LOST = object()  # inbox sentinel: the connection is gone
_LEAD_SLICE = 0.25  # longest a waiting thread reads at a time (then the receiver may, as it turns)


class StompBrokerError(Exception):
    """The broker answered with an ERROR frame (its ``message`` header, never the body)."""


class StompAuthError(StompBrokerError):
    """The broker refused the CONNECT (credentials, virtual host or permissions)."""


class ConnectionLost(StompException):  # type: ignore[misc]
    """The STOMP connection dropped (or stopped answering) while we waited on it."""


class SubscriptionEnded(StompBrokerError):
    """The broker ended one subscription with an ERROR naming it; the connection goes on."""


def _short(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:300] if lines else "no reason given"


_REFUSALS = ("access_refused", "access refused", "not authorized", "permission", "access denied")


def _broker_error(message: str) -> StompBrokerError:
    """An ERROR frame as an exception: a permission refusal is an authentication error."""
    low = message.lower()
    return (StompAuthError if any(r in low for r in _REFUSALS) else StompBrokerError)(message)


class Link(stomp.ConnectionListener):  # type: ignore[misc]
    """A connected STOMP session, shared by a backend's senders and subscriptions, from any thread:
    each write is one ``sendall`` under stomp.py's socket lock, ids come from one counter, and
    each waiter waits for its own receipts or reads its own inbox."""

    def __init__(
        self, host: str, port: int, *, login: str | None, passcode: str | None, vhost: str, heartbeat_ms: int,
        ssl: dict[str, Any] | None = None, extra_connect_headers: dict[str, str] | None = None,
        io_timeout: float = RECEIPT_TIMEOUT,
    ) -> None:
        _silence_stomp_py()
        # how long the broker may leave a CONNECT or a receipt unanswered (?io_timeout=)
        self.connect_timeout = min(CONNECT_TIMEOUT, io_timeout)
        self.receipt_timeout = io_timeout
        self.conn = stomp.Connection12(
            [(host, port)],
            heartbeats=(heartbeat_ms, heartbeat_ms),
            # ActiveMQ sends its first beat after twice the interval; 1.5 (the default) drops it.
            heart_beat_receive_scale=2.5,
            vhost=vhost,
            reconnect_attempts_max=1,
            auto_decode=False,
            try_loopback_connect=False,
        )
        if ssl is not None:
            self.conn.set_ssl(for_hosts=[(host, port)], **ssl)
        self.conn.set_listener("mqprimer", self)
        self.cond = threading.Condition()
        self.inbox = Inbox()  # MESSAGEs of no registered subscription (a reply path's)
        self.receipts: set[str] = set()
        self.receipt_errors: dict[str, str] = {}
        # receipt ids an event loop awaits (_stomp_aio.py: woken through _wake_fd), and those
        # of cancelled loop-side sends, whose RECEIPTs are dropped when they come
        self.awaited: set[str] = set()
        self.abandoned: set[str] = set()
        self._wake_fd: int | None = None
        self.error: str | None = None
        self.connected = False
        self.alive = False
        self.loop_done = False
        self.server = ""
        self.headers: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._login = login
        self._passcode = passcode
        self._extra = dict(extra_connect_headers or {})
        self.acks = AckWriter(lambda: self.conn.transport, lambda: self.alive)
        self.routes: dict[str, Inbox] = {}  # SUBSCRIBE id -> its subscription's inbox
        self.subscribed: dict[str, str] = {}  # SUBSCRIBE id -> its destination (for errors)
        self._routes_lock = threading.Lock()
        self.reader = Reader(self.conn, self.routes, self.inbox)
        self.reader.install()

    # -- listener callbacks (stomp.py's receiver thread) ----------------------------
    def on_connected(self, frame: Any) -> None:
        with self.cond:
            self.headers = dict(frame.headers)
            self.server = frame.headers.get("server", "")
            self.connected = self.alive = True
            self.cond.notify_all()

    def on_error(self, frame: Any) -> None:
        message = _short(frame.headers.get("message"))
        sid = frame.headers.get("subscription", "")
        with self._routes_lock:
            box = self.routes.pop(sid, None) if self.connected else None
            where = self.subscribed.pop(sid, sid)
        if box is not None:  # about one subscription only: the connection goes on
            box.put(SubscriptionEnded(f"the broker ended the subscription to {where}: {message} (queue deleted?)"))
            return
        if not self.connected and isinstance(frame.body, bytes):
            # a refused CONNECT says why in the body (RabbitMQ: "Bad CONNECT" + "Access refused
            # for user 'x'"); no payload can be in it yet, so its first line is safe to show
            detail = _short(frame.body.decode("utf-8", "replace"))
            if detail != "no reason given" and detail not in message:
                message = f"{message}: {detail}"
        with self.cond:
            rid = frame.headers.get("receipt-id")
            if rid is not None:
                self.receipt_errors[rid] = message
            if self.error is None:
                self.error = message
            self.cond.notify_all()
        self.kick_loop()

    def on_receipt(self, frame: Any) -> None:
        rid = frame.headers.get("receipt-id", "")
        with self.cond:
            if rid in self.abandoned:
                self.abandoned.discard(rid)
                return
            self.receipts.add(rid)
            self.cond.notify_all()
            if rid not in self.awaited:
                return
        self.kick_loop()

    def loop_waker(self) -> int | None:
        """The eventfd this link's receiver writes for an event loop awaiting a RECEIPT (made
        once, closed with the link object); ``None`` where there is no eventfd."""
        fd = self._wake_fd
        if fd is None and hasattr(os, "eventfd"):
            fd = self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            weakref.finalize(self, os.close, fd)
        return fd

    def kick_loop(self) -> None:
        if self.awaited and self._wake_fd is not None:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    def on_message(self, frame: Any) -> None:  # stomp.py's own reader (a version without the one we use)
        self.routes.get(frame.headers.get("subscription", ""), self.inbox).put([frame])

    def on_receiver_loop_completed(self, *_: Any) -> None:
        self.reader.close()
        with self.cond:
            self.loop_done = True  # its cleanup() closed the socket
            self.cond.notify_all()

    def on_disconnected(self) -> None:
        with self.cond:
            self.alive = False
            self.cond.notify_all()
        self._wake_all()

    def _wake_all(self) -> None:
        self.kick_loop()
        with self._routes_lock:
            boxes = {id(b): b for b in (self.inbox, *self.routes.values())}  # a subscription's ids share one
        for box in boxes.values():
            box.put(_LOST)

    # -- lifecycle --------------------------------------------------------------------
    def open(self) -> None:
        self.conn.connect(self._login, self._passcode, wait=False, headers=self._extra)
        sock = getattr(self.conn.transport, "socket", None)
        if sock is not None:
            # every write is whole frames in one call; Nagle would hold a frame written while the
            # previous one is unacknowledged (replies and requests sent without a receipt, back to
            # back) until the broker's delayed TCP ack: 40 ms here (docs/backend-stomp.md)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + self.connect_timeout
        with self.cond:
            while not self.connected:
                if self.error is not None:
                    if "already connected" in self.error.lower():  # an ActiveMQ client-id in use
                        raise StompBrokerError(f"the broker refused the STOMP CONNECT: {self.error}")
                    raise StompAuthError(f"the broker refused the STOMP CONNECT: {self.error}")
                if not self.conn.transport.running:
                    raise ConnectFailedException("connection closed during the STOMP handshake")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectFailedException(f"no CONNECTED frame within {self.connect_timeout:g}s")
                self.cond.wait(min(left, 0.25))

    def close(self) -> None:
        """Disconnect (the broker then gives every unacked message back). Never raises."""
        flushed = False
        try:
            # ACKs already given go out before the DISCONNECT; a write stuck on a broker that
            # stopped reading (holding the socket) means no DISCONNECT, only the socket's close
            self.check()
            flushed = self.acks.write_within(b"", 2.0)
        except Exception:
            pass
        was_alive, self.alive = self.alive, False
        self.acks.stop()
        try:
            if was_alive and flushed:
                rid = self.next_id("bye")
                self.conn.disconnect(receipt=rid)
                self._wait(lambda: rid in self.receipts or not self.conn.transport.running, 2.0)
                # the broker closes the connection after that receipt; stomp.py's receiver then
                # closes the socket itself, and a disconnect_socket() racing it logs a WARNING
                # ("unable to issue SHUT_RDWR ... Bad file descriptor"): let it finish first
                self._wait(lambda: self.loop_done, 0.5)
        except Exception:
            pass
        try:
            self.conn.transport.disconnect_socket()
        except Exception:
            pass
        self._wake_all()

    # -- helpers -------------------------------------------------------------------------
    def next_id(self, prefix: str = "r") -> str:
        return f"{prefix}{next(self._ids)}"

    def check(self) -> None:
        """Raise if the connection is no longer usable: after an ERROR too (the broker ends the
        connection then; the request that drew it has raised the ERROR's own error already)."""
        if not self.alive or self.error is not None:
            why = f" after the broker's ERROR: {self.error}" if self.error else ""
            raise ConnectionLost("the STOMP connection was lost" + why)

    def send_frame(self, cmd: str, headers: dict[str, str], body: bytes = b"") -> None:
        self.write(encode_frame(cmd, headers, body))

    def write(self, data: bytes) -> None:
        """Put encoded frames on the wire, the ACKs given so far in front: one system call for
        a whole batch (blocking: never from the event loop, see _stomp_acks.py).

        stomp.py's own path (Frame objects, listener callbacks, one ``sendall`` per frame)
        costs more than the broker round trip of an ACK; its transport's ``send`` (and, for
        TLS, the queue its I/O thread writes from) is all a frame needs.
        """
        self.check()
        try:
            self.acks.write(data, _sender(self.conn.transport))
        except NotConnectedException:
            raise ConnectionLost("the STOMP connection was lost") from None

    def _wait(self, done: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def wait_receipts(self, rids: Iterable[str], timeout: float | None = None) -> None:
        """Return when the broker acknowledged every receipt id; raise on ERROR or loss."""
        pending = set(rids)
        wait = self.receipt_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self.cond:
            while True:
                got = pending & self.receipts
                if got:
                    pending -= got
                    self.receipts -= got
                for rid in pending:
                    if rid in self.receipt_errors:
                        raise _broker_error(self.receipt_errors.pop(rid))
                if not pending:
                    return
                if self.error is not None:
                    raise _broker_error(self.error)
                if not self.alive:
                    raise ConnectionLost("the STOMP connection was lost before the broker confirmed")
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 1.0))
        self.close()  # a broker that stops answering is treated as gone
        raise ConnectionLost(f"no RECEIPT from the broker within {wait:g}s")

    # -- acknowledgements (_stomp_acks.py) -------------------------------------------------
    def ack(self, ack_id: str) -> None:
        """Queue an ACK; never waits (the asyncio twin calls it on its loop), and raises only
        before it has done anything (the connection is gone)."""
        self.check()
        self.acks.add(encode_ack(ack_id))

    def flush_acks(self) -> None:
        self.write(b"")

    def get(self, timeout: float | None, box: Inbox | None = None) -> Any:
        """The next MESSAGE frame of ``box`` (default: the link's own inbox), or ``None`` after
        ``timeout``; raises once the link is gone, or the broker ended that subscription."""
        self.check()
        box = self.inbox if box is None else box
        ready = box.ready
        if ready:
            try:
                return ready.popleft()
            except IndexError:  # another thread of this consumer took it
                pass
        q = box.q
        try:
            if timeout == 0:
                frame = q.get_nowait()  # a poll never writes nor reads the socket
            else:
                frame = q.get(timeout=self._lead(q, timeout))
        except queue.Empty:
            return None
        if type(frame) is list:  # one socket read's frames
            ready.extend(frame)
            try:
                return ready.popleft()
            except IndexError:
                return None  # taken by another thread of this consumer meanwhile
        if isinstance(frame, SubscriptionEnded):
            box.put(frame)  # every later call says the same
            raise frame
        if frame is _LOST:
            box.put(_LOST)
            self.check()
            raise ConnectionLost("the STOMP connection was lost")
        return frame

    def _lead(self, q: queue.SimpleQueue[Any], timeout: float | None) -> float | None:
        """Wait for ``q`` reading the socket on this thread while the receiver thread is idle
        (_stomp_wire.Reader.lead: one wake-up per delivery, not two); what is left of
        ``timeout`` for a wait on ``q`` once that ends (it has something, or no time left), or
        cannot go on (the receiver reads, the connection ends)."""
        now = time.monotonic()
        deadline = now + (timeout if timeout is not None else 1e9)
        reader = self.reader
        # about to wait: the broker gets every ACK first, written once the socket is this
        # thread's (an ACK that frees a prefetch slot then finds it reading), and never with a
        # blocking write there (the flusher takes what cannot go at once: see write_nowait)
        flush = self.acks.write_nowait if self.acks.pending and q.empty() else None
        while q.empty() and now < deadline and reader.lead(q, min(deadline, now + _LEAD_SLICE), flush):
            flush = None
            now = time.monotonic()
        if self.acks.pending and q.empty():
            self.flush_acks()  # it could not read: the ACKs go out before the wait all the same
        return None if timeout is None else max(0.0, deadline - time.monotonic())

    # -- subscriptions sharing the link ---------------------------------------------------
    def subscribe(self, frames: list[dict[str, str]], box: Inbox) -> None:
        """SUBSCRIBE with every frame (each has its ``id``), routing their MESSAGEs to ``box``."""
        self.check()
        self.acks.start()  # here, on the caller's thread: a first ACK may come from an event loop
        ids = [f["id"] for f in frames]
        with self._routes_lock:
            taken = [i for i in ids if i in self.routes]
            if taken:
                raise StompBrokerError(f"subscription id {taken[0]} is already in use on this connection")
            self.routes.update(dict.fromkeys(ids, box))
            self.subscribed.update({f["id"]: f["destination"] for f in frames})
        try:
            subs = [{**f, "receipt": self.next_id()} for f in frames]
            self.write(b"".join(encode_frame("SUBSCRIBE", f) for f in subs))
            self.wait_receipts(f["receipt"] for f in subs)
        except BaseException:
            self.unroute(ids)
            raise

    def unroute(self, ids: Iterable[str]) -> None:
        with self._routes_lock:
            for i in ids:
                self.routes.pop(i, None)
                self.subscribed.pop(i, None)

    def unsubscribe(self, ids: list[str], box: Inbox, unsettled: dict[str, str], park: bool) -> None:
        """UNSUBSCRIBE ``ids`` (those the broker has not ended); with ``park`` (RabbitMQ), give
        back what they hold: ``unsettled`` (ack id -> SUBSCRIBE id) and what waits in ``box``.

        RabbitMQ keeps an unsubscribed id's unacked messages until the connection closes and
        refuses a NACK once the id is gone. After the UNSUBSCRIBE receipt (all its MESSAGEs
        are in by then) each such id is subscribed again to a topic that never delivers, its
        messages NACKed through it (RabbitMQ requeues them: delivery tags are per connection)
        and it is unsubscribed. ActiveMQ gives them back on UNSUBSCRIBE by itself.
        """
        with self._routes_lock:
            ids = [i for i in ids if i in self.routes]
        try:
            if not self.alive or self.error is not None or not ids:
                return  # the connection is gone (the broker has everything back), or nothing to end
            unsub = {i: self.next_id() for i in ids}
            self.write(b"".join(encode_frame("UNSUBSCRIBE", {"id": i, "receipt": r}) for i, r in unsub.items()))
            self.wait_receipts(unsub.values())
            held = dict(unsettled)
            for f in box.drain() if park else ():
                held[f.headers["ack"]] = f.headers["subscription"]
            frames: list[bytes] = []
            rids: list[str] = []
            for sid in ids if park else ():
                acks = [encode_frame("NACK", {"id": a}) for a, i in held.items() if i == sid]
                if acks:
                    rids.append(self.next_id())
                    where = f"/topic/mqprimer.parked.{uuid.uuid4().hex}"
                    frames += [encode_frame("SUBSCRIBE", {"id": sid, "ack": "client-individual", "destination": where}),
                               *acks, encode_frame("UNSUBSCRIBE", {"id": sid, "receipt": rids[-1]})]
            if frames:
                self.write(b"".join(frames))
                self.wait_receipts(rids)
        finally:
            self.unroute(ids)
