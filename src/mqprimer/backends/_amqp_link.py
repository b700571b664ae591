"""AMQP plumbing under :mod:`mqprimer.backends.amqp`: URL options, one pika connection
with a heartbeat keeper, and a pipelined publisher-confirm channel.

pika's ``BlockingConnection`` is not thread-safe and only does I/O (heartbeats included)
inside its own calls. Each :class:`Link` therefore has a lock that every driver call
holds, and a keeper thread that, when the lock is free, lets pika answer heartbeats: a
connection whose user sits in a long handler stays alive, and one whose broker died or
froze is noticed within ``heartbeat + 5`` seconds (pika's check interval) even when idle.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as px
from pika.adapters.blocking_connection import ReturnedMessage
from pika.spec import Basic, BasicProperties

from .._ids import prepare
from ..errors import ConfigurationError
from ..url import URL

URL_PARAMS = frozenset({
    "heartbeat", "connect_timeout", "blocked_timeout", "max_priority", "exchange",
    "cafile", "certfile", "keyfile", "verify", "server_name",
})
_ACK_DELAY = 0.2  # longest an ack waits in pika's buffer while the consumer is busy elsewhere
_CLOSE_WAIT = 2.0  # longest close() waits for the broker's Close-Ok
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Options:
    """The URL query of an ``amqp://`` / ``amqps://`` URL, validated."""

    heartbeat: int = 10  # seconds; 0 disables (then a frozen broker is never noticed)
    connect_timeout: float = 10.0  # TCP + TLS + AMQP handshake, each attempt
    blocked_timeout: float = 30.0  # broker flow control (memory/disk alarm) longer than this = lost
    max_priority: int = 9  # x-max-priority of every queue mqprimer declares; 0 = no priority
    exchange: str = "mqprimer.topic"
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    server_name: str | None = None

    @classmethod
    def from_url(cls, url: URL) -> "Options":
        p = url.params

        def num(key: str, default: float, lo: float, hi: float, kind: type = float) -> Any:
            if key not in p:
                return default
            try:
                value = kind(p[key])
            except ValueError:
                value = None
            if value is None or not lo <= value <= hi:
                raise ConfigurationError(
                    f"{url}: {key} must be {'an integer' if kind is int else 'a number'} from {lo:g} to {hi:g}, "
                    f"got {p[key]!r}"
                )
            return value

        verify = p.get("verify", "true").lower()
        if verify not in _TRUE + _FALSE:
            raise ConfigurationError(f"{url}: verify must be true or false, got {p['verify']!r}")
        tls_keys = {"cafile", "certfile", "keyfile", "verify", "server_name"} & set(p)
        if tls_keys and url.scheme != "amqps":
            raise ConfigurationError(f"{url}: {', '.join(sorted(tls_keys))} only apply to amqps:// URLs")
        if ("keyfile" in p) and "certfile" not in p:
            raise ConfigurationError(f"{url}: keyfile needs certfile (the client certificate)")
        return cls(
            heartbeat=num("heartbeat", 10, 0, 3600, int),
            connect_timeout=num("connect_timeout", 10.0, 0.1, 600),
            blocked_timeout=num("blocked_timeout", 30.0, 0.1, 86400),
            max_priority=num("max_priority", 9, 0, 255, int),
            exchange=p.get("exchange", "mqprimer.topic") or "mqprimer.topic",
            cafile=p.get("cafile"), certfile=p.get("certfile"), keyfile=p.get("keyfile"),
            verify=verify in _TRUE, server_name=p.get("server_name"),
        )


def parameters(url: URL, opts: Options, name: str) -> pika.ConnectionParameters:
    tls = url.scheme == "amqps"
    host = url.host or "127.0.0.1"
    vhost = url.path[1:] if url.path.startswith("/") else url.path
    ssl_options = None
    if tls:
        ctx = ssl.create_default_context(cafile=opts.cafile)
        if opts.certfile:
            ctx.load_cert_chain(opts.certfile, opts.keyfile)
        if not opts.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ssl_options = pika.SSLOptions(ctx, opts.server_name or host)
    return pika.ConnectionParameters(
        host=host,
        port=url.port or (5671 if tls else 5672),
        virtual_host=vhost or "/",
        credentials=pika.PlainCredentials(url.username or "guest", url.password or "guest"),
        heartbeat=opts.heartbeat,
        socket_timeout=opts.connect_timeout,
        stack_timeout=opts.connect_timeout,
        blocked_connection_timeout=opts.blocked_timeout,
        connection_attempts=1,
        ssl_options=ssl_options,
        client_properties={"product": "mqprimer", "connection_name": name},
    )


def refused(exc: BaseException) -> BaseException:
    """A channel closed with 403 ACCESS_REFUSED is an access error, not a broker fault.

    pika reports it as ``ChannelClosedByBroker``; re-raise it as pika's own
    ``ProbableAccessDeniedError`` so that it maps to AuthenticationError (no reconnect storm).
    """
    if isinstance(exc, px.ChannelClosedByBroker) and exc.reply_code == 403:
        denied: BaseException = px.ProbableAccessDeniedError(exc.reply_code, exc.reply_text)
        return denied
    return exc


class Link:
    """One ``BlockingConnection``, its lock, and the keeper thread.

    The keeper, when the lock is free, lets pika answer heartbeats (every
    ``heartbeat / 2`` s) and writes out deferred acks (within ``_ACK_DELAY`` s).
    """

    def __init__(self, params: pika.ConnectionParameters, heartbeat: int) -> None:
        try:
            self.conn = pika.BlockingConnection(params)
        except px.AMQPConnectionError as exc:
            if str(exc).strip("(),' "):
                raise
            # pika's connect errors print as "" (only their repr says what happened)
            raise type(exc)(repr(exc)) from None
        self.lock = threading.Lock()
        self.error: BaseException | None = None  # what the keeper saw kill the connection
        self.unflushed = 0  # acks written to pika's buffer but not to the socket yet
        self.keeper = bool(heartbeat)
        self._stop = threading.Event()
        if heartbeat:
            interval = max(heartbeat / 2.0, 0.5)
            threading.Thread(target=self._keep, args=(interval,), name="mqprimer-amqp-keeper", daemon=True).start()

    def flush(self) -> None:
        """Write out what pika has buffered (in one send) and take in what arrived. Lock held."""
        coalesce(self.conn)
        self.conn.process_data_events(0)
        self.unflushed = 0

    def _keep(self, interval: float) -> None:
        last = time.monotonic()
        while not self._stop.wait(_ACK_DELAY):
            now = time.monotonic()
            if not self.unflushed and now - last < interval:
                continue
            if not self.lock.acquire(blocking=False):
                continue  # a driver call is doing I/O right now, heartbeats included
            try:
                if self._stop.is_set() or not self.conn.is_open:
                    return
                self.flush()
                last = now
            except Exception as exc:
                self.error = exc
                return
            finally:
                self.lock.release()

    def close(self) -> None:
        """Close politely, but give up after ``_CLOSE_WAIT`` s: a frozen broker never answers
        Connection.Close, and pika's own ``close()`` would wait for the heartbeat check."""
        self._stop.set()
        with self.lock:
            conn = self.conn
            if self.error is not None or not conn.is_open:
                return
            try:
                coalesce(conn)
                conn._impl.close()  # queued behind the deferred acks, so they go first
                deadline = time.monotonic() + _CLOSE_WAIT
                while not conn.is_closed and time.monotonic() < deadline:
                    conn.process_data_events(0.1)
            except Exception:
                pass  # closing a broken connection: nothing left to do


def coalesce(conn: pika.BlockingConnection) -> None:
    """Join pika's pending output into one buffer, so that it leaves in one ``send()``.

    pika writes every frame with its own ``send()`` (three per published message, one per
    ack); syscalls are the dominant cost here, so batches are joined first. This reaches
    into pika's transport (``_transport._tx_buffers``, pika 1.x); if that ever changes,
    nothing breaks, the frames just leave one by one again.
    """
    bufs = getattr(getattr(conn._impl, "_transport", None), "_tx_buffers", None)
    if bufs is not None and len(bufs) > 1:
        data = b"".join(bufs)
        bufs.clear()
        bufs.append(data)


def _noop() -> None:
    pass


class Confirmer:
    """A channel in confirm mode that pipelines: publish a batch, then wait for every confirm.

    pika's ``BlockingChannel.basic_publish`` waits for each confirm in turn (one round
    trip per message); here the publishes go out back to back on the channel underneath
    (``BlockingChannel._impl``, pika's async ``Channel``) and the confirms are counted
    as they arrive. Declarations use the blocking channel as usual.
    """

    def __init__(self, link: Link) -> None:
        self.link = link
        self.channel = link.conn.channel()
        self._impl = self.channel._impl
        self._outstanding: OrderedDict[int, int] = OrderedDict()  # delivery tag -> index in batch
        self._nacked: list[int] = []
        self.returned: list[ReturnedMessage] = []  # mandatory messages the broker could not route
        self._seq = 0
        self._ready = False
        self.closed: BaseException | None = None
        self._impl.add_on_close_callback(self._on_close)
        self._impl.add_on_return_callback(self._on_return)
        self._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_select_ok)
        self._wait(lambda: self._ready)

    # -- pika callbacks (run inside process_data_events) ---------------------------------
    def _wake(self) -> None:
        # a ready connection event ends process_data_events(None) at once
        self.link.conn.call_later(0, _noop)

    def _on_select_ok(self, _frame: Any) -> None:
        self._ready = True
        self._wake()

    def _on_close(self, _channel: Any, reason: BaseException) -> None:
        self.closed = reason
        self._wake()

    def _on_return(self, _channel: Any, method: Any, props: BasicProperties, body: bytes) -> None:
        self.returned.append(ReturnedMessage(method, props, body))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nack = isinstance(method, Basic.Nack)
        out = self._outstanding
        if method.multiple:
            while out:
                tag = next(iter(out))
                if tag > method.delivery_tag:
                    break
                idx = out.pop(tag)
                if nack:
                    self._nacked.append(idx)
        else:
            idx = out.pop(method.delivery_tag, -1)
            if nack and idx >= 0:
                self._nacked.append(idx)
        if not out:
            self._wake()

    # -- driver side --------------------------------------------------------------------
    def _wait(self, done: Callable[[], bool]) -> None:
        while not done():
            if self.closed is not None:
                raise refused(self.closed)
            # returns early on _wake(); the limit only bounds a missed wake-up
            self.link.conn.process_data_events(time_limit=1.0)

    def publish(self, batch: Sequence[tuple[str, str, bytes, BasicProperties, bool]]) -> None:
        """Publish ``(exchange, routing_key, body, properties, mandatory)`` items; return when all are confirmed."""
        if self.closed is not None:
            raise refused(self.closed)
        self._nacked.clear()
        self.returned = []
        out = self._outstanding
        publish = self._impl.basic_publish
        for i, (exchange, key, body, props, mandatory) in enumerate(batch):
            publish(exchange, key, body, props, mandatory)
            self._seq += 1
            out[self._seq] = i
            if i % 512 == 511:  # write out and take confirms in, so buffers stay bounded
                self.link.flush()
        coalesce(self.link.conn)
        prepare()  # the next message's id, made while RabbitMQ confirms this batch (see _ids)
        self._wait(lambda: not self._outstanding)
        if self._nacked:
            raise px.NackError([])  # the broker refused them (internal error): nothing was stored
        if self.returned:
            raise px.UnroutableError(self.returned)
