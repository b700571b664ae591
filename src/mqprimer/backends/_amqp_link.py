"""AMQP plumbing under :mod:`mqprimer.backends.amqp`: URL options, one pika connection run
by one I/O thread, and the channel base class (the channel kinds: ``_amqp_channels``).

Why one I/O thread running pika's ``SelectConnection``: a ``BlockingConnection`` does I/O
only inside its own calls, from one thread at a time, so many subscriptions on one of them
would share a lock that a consumer waiting for messages holds against every other
consumer, every ack and every publish (or a keeper thread would fight them for it). Here
one thread runs the connection's ioloop and owns every pika object; other threads hand it
work through :meth:`Link.submit` (``add_callback_threadsafe``, pika's one thread-safe
call, with wake-ups merged) and wait on a :class:`Waiter` (a bare lock) for the answer,
while deliveries reach consumers through a ``queue.SimpleQueue`` each (C code, no Python
lock). Requests, replies and acks skip the hand-off when the socket is idle: their thread
writes their frames itself (``_amqp_out``); and a thread waiting for a delivery or a reply
reads the socket itself while the I/O thread is idle (``_amqp_read``). Heartbeats and broker flow control are pika's
own timers on that loop, so a handler that holds a message for minutes keeps its
connection, and a dead or frozen broker is noticed within ``heartbeat + 5`` s (pika's
check interval) even when nobody calls.
A connection costs one thread and four file descriptors (socket, epoll, wake-up pair),
whatever the number of channels on it.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as px
from pika.adapters.blocking_connection import BlockingConnection
from pika.adapters.select_connection import IOLoop, SelectConnection

from ..errors import ConfigurationError
from ..url import URL
from ._amqp_out import Output
from ._amqp_read import Reader

log = logging.getLogger("mqprimer")

URL_PARAMS = frozenset({
    "heartbeat", "connect_timeout", "blocked_timeout", "max_priority", "exchange",
    "cafile", "certfile", "keyfile", "verify", "server_name",
})
_ACK_DELAY = 0.2  # longest an ack waits while its consumer is busy elsewhere
_CLOSE_WAIT = 2.0  # longest a close waits for the broker's Close-Ok
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
Step = Callable[[Any, Callable[[Any], None]], None]  # (pika channel, done) -> None; done(result) when answered


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


class Waiter:
    """One answer from the I/O thread: a value or an exception, set once."""

    __slots__ = ("_lock", "value", "error", "done")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self.done:
            self.done, self.value, self.error = True, value, error
            self._lock.release()

    def wait(self, timeout: float | None = None) -> Any:
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise px.AMQPConnectionError(f"no answer from the broker within {timeout:g}s")
        if self.error is not None:
            raise self.error
        return self.value


class Link:
    """One ``SelectConnection`` and the thread that runs its ioloop (see the module doc)."""

    def __init__(self, params: pika.ConnectionParameters) -> None:
        self.error: BaseException | None = None  # what ended the connection
        self._lock = threading.Lock()  # guards error and _pending
        self._pending: set[Waiter] = set()  # answers user threads wait for
        self._todo: deque[Callable[[], None]] = deque()
        self._woken = False
        self.chans: set[Chan] = set()  # open channels (I/O thread only)
        # the last receive() left deliveries waiting: replies go with the I/O thread's batch then
        self.backlog = False
        self.flushers: set[Any] = set()  # subscriptions with acks to write out (I/O thread only)
        ioloop = IOLoop()
        ioloop.activate_poller()
        done: list[Any] = []
        try:  # connect in the caller's thread, as BlockingConnection does: same errors, same timeouts
            SelectConnection.create_connection([params], on_done=done.append, custom_ioloop=ioloop)
            while not done:
                ioloop.poll()
                ioloop.process_timeouts()
        except ValueError as raised:
            # raised out of poll() by pika's socket checks (the same as below, on another path:
            # io_services_utils re-raises what create_streaming_connection met)
            ioloop.close()
            raise px.AMQPConnectionError(f"{type(raised).__name__}: {raised}") from None
        except BaseException:
            ioloop.close()
            raise
        if isinstance(done[0], BaseException):
            ioloop.close()
            exc = BlockingConnection._reap_last_connection_workflow_error(done[0])
            if not isinstance(exc, (px.AMQPError, OSError)):
                # pika's own checks while it set the socket up, e.g. "Expected connected socket,
                # but getpeername() failed" (ValueError) when the peer reset it at once (a CI
                # failover run): the attempt failed, so a connection error, retried as one
                exc = px.AMQPConnectionError(f"{type(exc).__name__}: {exc}")
            if not str(exc).strip("(),' "):  # pika's connect errors print as "" (only their repr tells)
                exc = type(exc)(repr(exc))
            raise exc
        ioloop.deactivate_poller()  # start() activates it again, in the I/O thread
        self.conn: SelectConnection = done[0]
        transport: Any = getattr(self.conn, "_transport", None)
        if transport is not None:
            # pika reads 4 KiB per recv(), 100 KiB per wake-up: every recv() is a system call
            # (costly here) and a release of the GIL that a busy consumer thread then keeps for
            # up to 5 ms; bigger reads hand consumers bursts of hundreds of messages instead of
            # a dozen (pika 1.x attribute names; if they change, reads are just smaller again)
            transport._MAX_RECV_BYTES = 256 * 1024
            transport._MAX_CONSUME_BYTES = 1024 * 1024
        self.ioloop = ioloop
        self.out = Output(self.conn, self.submit, lambda: self._woken)  # who writes to the socket (_amqp_out)
        # who reads it (_amqp_read): a waiting thread, while the I/O thread is idle
        self.reader = Reader(ioloop, transport._sock if self.out.plain else None, self.out.coalesce, self._crash)
        self.conn.add_on_close_callback(self._on_close)
        self.ioloop.call_later(_ACK_DELAY, self._tick)
        self.thread = threading.Thread(target=self._run, name="mqprimer-amqp-io", daemon=True)
        self.thread.start()

    # -- I/O thread ----------------------------------------------------------------------
    def _run(self) -> None:
        self.reader.enter()
        try:
            self.ioloop.start()
        except BaseException as exc:  # pika itself failed: nobody may wait for this loop any more
            self._fail_all(px.ConnectionWrongStateError(f"the AMQP I/O thread failed: {exc!r}"))
            raise
        finally:
            self.ioloop.close()  # the epoll fd and the wake-up pair

    def _do_todo(self) -> None:
        self._woken = False  # before draining: a submit from now on wakes the loop again
        todo = self._todo
        while todo:
            fn = todo.popleft()
            try:
                fn()
            except Exception as exc:  # one caller's failure must not stop the loop of all
                log.debug("AMQP I/O thread: %r", exc)
        self.out.coalesce()

    def _tick(self) -> None:
        for sub in list(self.flushers):
            try:
                sub.drain_acks()
            except Exception as exc:
                log.debug("AMQP I/O thread: %r", exc)
        self.out.coalesce()
        self.ioloop.call_later(_ACK_DELAY, self._tick)

    def _crash(self, exc: BaseException) -> None:
        """pika failed in a thread that ran the loop for the I/O thread (_amqp_read)."""
        self._fail_all(px.ConnectionWrongStateError(f"the AMQP connection's loop failed: {exc!r}"))
        self.ioloop.stop()

    def _on_close(self, _conn: Any, reason: BaseException) -> None:
        self._fail_all(reason)
        self.ioloop.stop()

    def _fail_all(self, reason: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = reason
            pending, self._pending = self._pending, set()
        for w in pending:
            w.set(error=reason)
        for chan in list(self.chans):
            chan.on_close(None, reason)

    def _abort(self) -> None:
        if not self.conn.is_closed:
            self.conn._adapter_disconnect_stream()  # a frozen broker never answers Close

    # -- any thread ------------------------------------------------------------------------
    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread soon; raise if the connection is gone."""
        if self.error is not None:
            raise self.error
        self._todo.append(fn)
        if not self._woken:  # one wake-up for what piles up before the loop runs
            self._woken = True
            self.ioloop.add_callback_threadsafe(self._do_todo)

    def submit_ordered(self, queued: deque[None], fn: Callable[[], None]) -> None:
        """:meth:`submit` ``fn``, counted in ``queued`` until it has run: a direct write
        (``_amqp_out``) of the same channel checks ``queued`` and waits behind it."""

        def run() -> None:
            try:
                fn()
            finally:
                queued.pop()  # after fn's frames are in pika's buffer: a direct write sees them there

        queued.append(None)
        try:
            self.submit(run)
        except BaseException:
            queued.pop()
            raise

    def call(self, fn: Callable[[Waiter], None], timeout: float | None = None,
             meanwhile: Callable[[], None] | None = None) -> Any:
        """Run ``fn(waiter)`` on the I/O thread and wait for what it (or a callback) sets;
        ``meanwhile`` runs in this thread while the broker works."""
        w = Waiter()
        with self._lock:
            if self.error is not None:
                raise self.error
            self._pending.add(w)

        def run() -> None:
            try:
                fn(w)
            except Exception as exc:
                w.set(error=exc)

        try:
            self.submit(run)
            if meanwhile is not None:
                meanwhile()
            return w.wait(timeout)
        finally:
            with self._lock:
                self._pending.discard(w)

    def close(self) -> None:
        """Close politely (pending acks first), but give up after ``_CLOSE_WAIT`` s."""
        if threading.current_thread() is self.thread:
            return
        try:
            self.submit(lambda: self.conn.close() if self.conn.is_open else None)
        except Exception:
            pass  # already gone
        self.thread.join(_CLOSE_WAIT)
        if self.thread.is_alive():
            try:
                self.submit(self._abort)
            except Exception:
                pass
            self.thread.join(_CLOSE_WAIT)


class Chan:
    """One channel of a :class:`Link`. User threads drive it with :meth:`run`; what the
    broker says arrives in pika callbacks on the I/O thread."""

    def __init__(self, link: Link, on_closed: Callable[[BaseException], None] | None = None) -> None:
        self.link = link
        self._on_closed = on_closed
        self.ch: Any = None  # pika's Channel (I/O thread only)
        self.closed: BaseException | None = None
        self.waiter: Waiter | None = None  # the run() under way, failed if the channel closes

    def open_step(self, ch: Any, done: Callable[[Any], None]) -> None:
        self.ch = self.link.conn.channel(on_open_callback=done)
        self.ch.add_on_close_callback(self.on_close)
        self.link.chans.add(self)

    def run(self, *steps: Step, timeout: float | None = None) -> Any:
        """Run ``steps`` one after another on the I/O thread (each calls ``done`` when
        answered); return the last one's result. A channel closed meanwhile raises why."""

        def start(w: Waiter) -> None:
            if self.closed is not None:
                w.set(error=refused(self.closed))
                return
            self.waiter = w
            it = iter(steps)

            def nxt(result: Any = None) -> None:
                step = next(it, None)
                if step is None:
                    self.waiter = None
                    w.set(result)
                else:
                    step(self.ch, nxt)

            nxt()

        return self.link.call(start, timeout)

    def on_close(self, _ch: Any, reason: BaseException) -> None:
        """pika's channel close callback (also called for a lost connection)."""
        if self.closed is None:
            self.closed = reason
            self.link.chans.discard(self)
            if self.waiter is not None:
                self.waiter.set(error=refused(reason))
            self.closed_hook(reason)

    def closed_hook(self, reason: BaseException) -> None:
        """What an owner does when the channel closes (I/O thread)."""
        if self._on_closed is not None:
            self._on_closed(reason)

    def close(self) -> None:
        """Close the channel and wait (at most ``_CLOSE_WAIT`` s) for the broker's Close-Ok;
        the broker then has every unacked delivery of it back."""
        if self.closed is not None or self.link.error is not None:
            return

        def step(ch: Any, _done: Callable[[Any], None]) -> None:
            ch.close()  # on_close (ChannelClosedByClient) ends the wait

        try:
            self.run(step, timeout=_CLOSE_WAIT)
        except (px.ChannelClosedByClient, px.AMQPError):
            pass
