"""One STOMP 1.2 connection (stomp.py) with receipts, an inbox and loss detection.

stomp.py delivers frames on its own receiver thread and never reconnects. A :class:`Link`
turns that into calls that either complete or raise: every wait (CONNECTED, receipts,
the inbox) also ends when the connection drops or the broker sends ERROR, so a lost
broker surfaces as an exception from publish / receive / ack, never as a hang.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

import stomp
from stomp.exception import ConnectFailedException, NotConnectedException, StompException

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


class StompBrokerError(Exception):
    """The broker answered with an ERROR frame (its ``message`` header, never the body)."""


class StompAuthError(StompBrokerError):
    """The broker refused the CONNECT (credentials, virtual host or permissions)."""


class ConnectionLost(StompException):  # type: ignore[misc]
    """The STOMP connection dropped (or stopped answering) while we waited on it."""


def _short(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:300] if lines else "no reason given"


_REFUSALS = ("access_refused", "access refused", "not authorized", "permission", "access denied")


def _broker_error(message: str) -> StompBrokerError:
    """An ERROR frame as an exception: a permission refusal is an authentication error."""
    low = message.lower()
    return (StompAuthError if any(r in low for r in _REFUSALS) else StompBrokerError)(message)


class Link(stomp.ConnectionListener):  # type: ignore[misc]
    """A connected STOMP session. Not thread-safe for senders: the backend serialises calls."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        login: str | None,
        passcode: str | None,
        vhost: str,
        heartbeat_ms: int,
        ssl: dict[str, Any] | None = None,
        extra_connect_headers: dict[str, str] | None = None,
    ) -> None:
        _silence_stomp_py()
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
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.receipts: set[str] = set()
        self.receipt_errors: dict[str, str] = {}
        self.error: str | None = None
        self.connected = False
        self.alive = False
        self.server = ""
        self.headers: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._login = login
        self._passcode = passcode
        self._extra = dict(extra_connect_headers or {})

    # -- listener callbacks (stomp.py's receiver thread) ----------------------------
    def on_connected(self, frame: Any) -> None:
        with self.cond:
            self.headers = dict(frame.headers)
            self.server = frame.headers.get("server", "")
            self.connected = self.alive = True
            self.cond.notify_all()

    def on_error(self, frame: Any) -> None:
        message = _short(frame.headers.get("message"))
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

    def on_receipt(self, frame: Any) -> None:
        with self.cond:
            self.receipts.add(frame.headers.get("receipt-id", ""))
            self.cond.notify_all()

    def on_message(self, frame: Any) -> None:
        self.inbox.put(frame)

    def on_disconnected(self) -> None:
        with self.cond:
            self.alive = False
            self.cond.notify_all()
        self.inbox.put(_LOST)

    # -- lifecycle --------------------------------------------------------------------
    def open(self) -> None:
        self.conn.connect(self._login, self._passcode, wait=False, headers=self._extra)
        deadline = time.monotonic() + CONNECT_TIMEOUT
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
                    raise ConnectFailedException(f"no CONNECTED frame within {CONNECT_TIMEOUT:.0f}s")
                self.cond.wait(min(left, 0.25))

    def close(self) -> None:
        """Disconnect (the broker then gives every unacked message back). Never raises."""
        was_alive, self.alive = self.alive, False
        try:
            if was_alive:
                rid = self.next_id("bye")
                self.conn.disconnect(receipt=rid)
                self._wait(lambda: rid in self.receipts or not self.conn.transport.running, 2.0)
        except Exception:
            pass
        try:
            self.conn.transport.disconnect_socket()
        except Exception:
            pass
        self.inbox.put(_LOST)

    # -- helpers -------------------------------------------------------------------------
    def next_id(self, prefix: str = "r") -> str:
        return f"{prefix}{next(self._ids)}"

    def check(self) -> None:
        """Raise if the connection is no longer usable."""
        if not self.alive:
            why = f" after the broker's ERROR: {self.error}" if self.error else ""
            raise ConnectionLost("the STOMP connection was lost" + why)
        if self.error is not None:
            raise _broker_error(self.error)

    def send_frame(self, cmd: str, headers: dict[str, str], body: bytes = b"") -> None:
        self.check()
        if body:
            headers["content-length"] = str(len(body))
        try:
            self.conn.send_frame(cmd, headers, body)
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

    def wait_receipts(self, rids: Iterable[str], timeout: float = RECEIPT_TIMEOUT) -> None:
        """Return when the broker acknowledged every receipt id; raise on ERROR or loss."""
        pending = set(rids)
        deadline = time.monotonic() + timeout
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
        raise ConnectionLost(f"no RECEIPT from the broker within {timeout:.0f}s")

    def get(self, timeout: float | None) -> Any:
        """The next MESSAGE frame, or ``None`` after ``timeout``; raises once the link is gone."""
        self.check()
        try:
            frame = self.inbox.get(timeout=timeout) if timeout != 0 else self.inbox.get_nowait()
        except queue.Empty:
            return None
        if frame is _LOST:
            self.inbox.put(_LOST)
            self.check()
            raise ConnectionLost("the STOMP connection was lost")
        return frame
