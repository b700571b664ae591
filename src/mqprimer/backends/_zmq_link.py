"""ZeroMQ plumbing for the zeromq backend: URL options, sockets (CURVE, HWM, linger), and
the acknowledged mode (``?ack=1``), whose producer keeps every message until a consumer acks it.

Acknowledged mode, on the wire (one ROUTER bound by the producer, one DEALER per consumer)::

    consumer -> producer   [b"C", queue, credit]   subscribe / grant more credit
                           [b"A", tag]             ack (and one more credit)
                           [b"Y", tag, payload]    retry: requeue this new payload (one more credit)
                           [b"D", tag, payload]    dead letter: keep it under <queue>.dead (one more credit)
                           [b"R", tag...]          give back unsettled deliveries (close)
                           [b"H"]                  heartbeat (touch; receive polls send it too)
    producer -> consumer   [tag, n, payload]       one delivery, the n-th of this message (n > 1: redelivered
                                                   after a consumer went silent; the envelope's attempt + n - 1)

The producer's store runs on one thread of its own (a ROUTER socket is not thread safe, and
dispatch must go on while the application does something else). A consumer not heard from
for ``lease`` seconds is presumed dead: its unacked messages go to the other consumers.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ..errors import ConfigurationError
from ..url import URL

log = logging.getLogger("mqprimer")

OPTIONS = frozenset({"bind", "ack", "hwm", "linger", "send_timeout", "join", "pub_port", "lease",
                     "curve_secret", "curve_server", "curve_allow"})
_LOOPBACK = ("127.", "::1", "localhost")


@dataclass(frozen=True)
class Settings:
    """Everything a zmq URL says, checked once."""

    queue_addr: str  # PUSH/PULL (plain) or ROUTER/DEALER (ack)
    topic_addr: str  # PUB/SUB
    bind: str  # "consumer", "producer" or "none"
    ack: bool
    hwm: int
    linger_ms: int
    send_timeout_ms: int
    join: float
    lease: float
    curve_secret: Path | None
    curve_server: Path | None
    curve_allow: Path | None
    ipv6: bool
    reply_base: str  # where reply paths bind (tcp: this host, any port; ipc: PATH.)

    @property
    def consumer_binds(self) -> bool:
        return self.bind == "consumer"

    @property
    def producer_binds(self) -> bool:
        return self.bind == "producer"


def _num(url: URL, key: str, default: float, low: float, high: float) -> float:
    text = url.param(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise ConfigurationError(f"{url}: {key}={text!r} must be a number from {low:g} to {high:g}")
    return value


def _file(url: URL, key: str, directory: bool = False) -> Path | None:
    text = url.param(key)
    if text is None:
        return None
    path = Path(text)
    if not (path.is_dir() if directory else path.is_file()):
        kind = "directory of public key files" if directory else "key file (zmq.auth.create_certificates)"
        raise ConfigurationError(f"{url}: {key} must name an existing {kind}; {text!r} is not one")
    return path


def parse(url: URL) -> Settings:
    bind = (url.param("bind") or ("producer" if url.param("ack") == "1" else "consumer")).lower()
    if bind not in ("consumer", "producer", "none"):
        raise ConfigurationError(f"{url}: bind={bind!r}: use consumer (default), producer or none (both sides "
                                 "connect, to a `mqprimer zmq-device`)")
    ack = (url.param("ack") or "0") in ("1", "true", "yes")
    if ack and bind != "producer":
        raise ConfigurationError(f"{url}: acknowledged mode (ack=1) needs bind=producer: the producer is the store "
                                 "and its consumers connect to it")
    ipv6 = False
    if url.scheme == "zmq+ipc":
        if url.hosts or not url.path or url.path == "/":
            raise ConfigurationError(f"{url}: an ipc URL names a socket path: zmq+ipc:///run/app/jobs.sock")
        queue_addr, topic_addr = f"ipc://{url.path}", f"ipc://{url.path}.pub"
        reply_base = f"ipc://{url.path}.reply-"
        if url.param("pub_port"):
            raise ConfigurationError(f"{url}: pub_port is for zmq+tcp://; zmq+ipc:// publishes on PATH.pub")
    else:
        if url.host is None or url.port is None or len(url.hosts) != 1:
            raise ConfigurationError(f"{url}: a tcp URL names one host and port: zmq+tcp://127.0.0.1:5555")
        host = url.host
        ipv6 = ":" in host
        h = f"[{host}]" if ipv6 else host
        pub_port = int(_num(url, "pub_port", min(url.port + 1, 65535), 1, 65535))
        queue_addr, topic_addr = f"tcp://{h}:{url.port}", f"tcp://{h}:{pub_port}"
        reply_base = f"tcp://{h}:"
    return Settings(
        queue_addr=queue_addr, topic_addr=topic_addr, bind=bind, ack=ack,
        hwm=int(_num(url, "hwm", 10_000, 1, 10_000_000)),
        linger_ms=int(_num(url, "linger", 1.0, 0, 3600) * 1000),
        send_timeout_ms=int(_num(url, "send_timeout", 5.0, 0.001, 3600) * 1000),
        join=_num(url, "join", 0.5, 0, 60),
        lease=_num(url, "lease", 10.0, 0.05, 86400),
        curve_secret=_file(url, "curve_secret"), curve_server=_file(url, "curve_server"),
        curve_allow=_file(url, "curve_allow", directory=True), ipv6=ipv6, reply_base=reply_base,
    )


def warn_if_exposed(url: URL, s: Settings) -> None:
    if url.scheme == "zmq+tcp" and s.curve_secret is None and s.curve_server is None:
        if not (url.host or "").startswith(_LOOPBACK):
            log.warning("%s: plain ZeroMQ TCP beyond loopback: anyone who reaches the port reads and writes "
                        "messages; set curve_secret/curve_server (CURVE) or keep it on 127.0.0.1", url)


# -- one context per process (contexts do not survive fork) ------------------------------
_ctx: zmq.Context[zmq.Socket[bytes]] | None = None
_auth: ThreadAuthenticator | None = None
_ctx_lock = threading.Lock()


def context() -> zmq.Context[zmq.Socket[bytes]]:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            _ctx = zmq.Context()
        return _ctx


def _after_fork() -> None:
    global _ctx, _auth, _ctx_lock
    _ctx, _auth, _ctx_lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def _authenticator(allow: Path) -> None:
    """pyzmq's own ZAP handler: only clients whose public key file is in ``allow`` get in."""
    global _auth
    with _ctx_lock:
        if _auth is None:
            assert _ctx is not None
            _auth = ThreadAuthenticator(_ctx)
            _auth.start()
        _auth.configure_curve(domain="*", location=str(allow))


def socket(s: Settings, kind: int, addr: str, bind: bool) -> zmq.Socket[bytes]:
    """A socket with deliberate HWMs, linger, timeouts and CURVE, bound or connected to ``addr``."""
    sock = context().socket(kind)
    try:
        sock.linger = s.linger_ms
        sock.sndhwm = s.hwm
        sock.rcvhwm = s.hwm
        sock.sndtimeo = s.send_timeout_ms
        sock.reconnect_ivl = 100
        sock.reconnect_ivl_max = 0  # no backoff: a peer that comes up is found within 100 ms (join)
        if s.ipv6:
            sock.ipv6 = True
        _curve(s, sock, bind)
        if bind:
            _bind(sock, addr)
        else:
            sock.connect(addr)
    except BaseException:
        sock.close(0)
        raise
    return sock


unbound: dict[str, float] = {}  # address -> when this process closed a socket bound to it


def _bind(sock: zmq.Socket[bytes], addr: str) -> None:
    """libzmq closes listeners asynchronously: an address this process let go of a moment ago
    may still be held. Only then wait for it, briefly; any other EADDRINUSE is an error."""
    deadline = unbound.get(addr, 0.0) + 2.0
    while True:
        try:
            sock.bind(addr)
            return
        except zmq.ZMQError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def close_bound(sock: zmq.Socket[bytes], addr: str) -> None:
    """Close a bound socket only once its listener is gone (bounded by 1 s): libzmq closes
    sockets asynchronously, and a peer connecting in that window reaches the dying listener
    and loses what it sends. Seen as a rare loss when an address is bound again at once."""
    try:
        mon = sock.get_monitor_socket(zmq.EVENT_CLOSED)
        try:
            sock.unbind(addr)
            mon.poll(1000)
        finally:
            sock.disable_monitor()
            mon.close(0)
    except zmq.ZMQError:
        pass  # closing anyway
    sock.close()
    unbound[addr] = time.monotonic()


def _curve(s: Settings, sock: zmq.Socket[bytes], server: bool) -> None:
    if s.curve_secret is None and s.curve_server is None:
        return
    if server:
        if s.curve_secret is None:
            raise ConfigurationError("the binding side of a CURVE link needs curve_secret=<its secret key file>")
        public, secret = zmq.auth.load_certificate(s.curve_secret)
        if secret is None:
            raise ConfigurationError(f"curve_secret={s.curve_secret}: no secret key in that file")
        if s.curve_allow is not None:
            _authenticator(s.curve_allow)
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
        return
    if s.curve_server is None:
        raise ConfigurationError("the connecting side of a CURVE link needs curve_server=<the server's public key "
                                 "file>")
    server_key, _ = zmq.auth.load_certificate(s.curve_server)
    if s.curve_secret is not None:
        public, secret = zmq.auth.load_certificate(s.curve_secret)
    else:
        public, secret = zmq.curve_keypair()  # encrypted, but anonymous: refused where curve_allow is set
    if secret is None:
        raise ConfigurationError(f"curve_secret={s.curve_secret}: no secret key in that file")
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret


# -- acknowledged mode: the producer's store ----------------------------------------------
class _Peer:
    __slots__ = ("queue", "credit", "inflight", "seen")

    def __init__(self, queue: bytes) -> None:
        self.queue = queue
        self.credit = 0
        self.inflight: dict[bytes, bytes] = {}  # tag -> payload
        self.seen = time.monotonic()


class AckStore:
    """The producer side: a ROUTER bound to the queue address and the thread that serves it."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.incoming: deque[tuple[bytes, bytes]] = deque()  # (queue, payload) from publish()
        self.ready: dict[bytes, deque[tuple[bytes, bytes]]] = {}  # queue -> (tag, payload)
        self.peers: dict[bytes, _Peer] = {}
        self.deliveries: dict[bytes, int] = {}  # tag -> times delivered, until settled
        self.tags = itertools.count(1)
        self.lock = threading.Lock()
        self.idle = threading.Event()
        self.stopping = False
        self.error: BaseException | None = None
        self.router = socket(s, zmq.ROUTER, s.queue_addr, bind=True)
        self.router.router_mandatory = False
        ctx = context()
        wake_addr = f"inproc://mqprimer-ack-{id(self)}"
        self.wake_rx = ctx.socket(zmq.PULL)
        self.wake_rx.bind(wake_addr)
        self.wake_tx = ctx.socket(zmq.PUSH)
        self.wake_tx.linger = 0
        self.wake_tx.connect(wake_addr)
        self.thread = threading.Thread(target=self._run, name="mqprimer-zmq-ack", daemon=True)
        self.thread.start()

    # -- called by the application thread ---------------------------------------------
    def put(self, queue: bytes, payload: bytes) -> None:
        self.incoming.append((queue, payload))
        self.idle.clear()
        with self.lock:  # the PUSH end of the wake-up pipe is shared by every backend of this store
            if not self.stopping:
                self.wake_tx.send(b"", zmq.NOBLOCK)

    def pending(self) -> int:
        """Messages not acked yet (only exact on the store's thread or once it stopped)."""
        return (len(self.incoming) + sum(len(q) for q in list(self.ready.values()))
                + sum(len(p.inflight) for p in list(self.peers.values())))

    def close(self, wait: float) -> None:
        """Stop serving after every message is acked or ``wait`` seconds (then unacked ones are lost)."""
        self.idle.wait(wait)
        with self.lock:
            self.stopping = True
            self.wake_tx.send(b"", zmq.NOBLOCK)
        self.thread.join(5.0)
        self.wake_tx.close(0)
        lost = self.pending()
        if lost:
            log.warning("acknowledged zmq producer on %s closed with %d message(s) not acked: lost",
                        self.s.queue_addr, lost)

    # -- the store's thread -------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_rx, zmq.POLLIN)
        tick = int(min(self.s.lease / 4, 0.25) * 1000)
        try:
            while not self.stopping:
                events = dict(poller.poll(tick))
                if self.wake_rx in events:
                    while self.wake_rx.poll(0):
                        self.wake_rx.recv()
                while self.incoming:
                    queue, payload = self.incoming.popleft()
                    self.ready.setdefault(queue, deque()).append((b"%d" % next(self.tags), payload))
                if self.router in events:
                    for _ in range(1000):
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                self._expire()
                self._dispatch()
                if not self.pending():
                    self.idle.set()
        except BaseException as exc:  # pragma: no cover - reported by the next publish
            self.error = exc
            log.error("acknowledged zmq producer on %s stopped: %s", self.s.queue_addr, exc)
        finally:
            close_bound(self.router, self.s.queue_addr)
            self.wake_rx.close(0)

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        ident, op = frames[0], frames[1]
        peer = self.peers.get(ident)
        if op == b"C" and len(frames) == 4:
            # (re)subscribe: "my window is N and I hold nothing" (a consumer whose lease ran out
            # gave up what it held: that went, or goes now, to the others)
            if peer is not None:
                self._drop(ident)
            peer = self.peers[ident] = _Peer(frames[2])
            peer.credit = int(frames[3])
        if peer is None:
            return  # a consumer already presumed dead: its messages went to others
        peer.seen = time.monotonic()
        if op in (b"A", b"Y", b"D") and len(frames) >= 3:
            payload = peer.inflight.pop(frames[2], None)
            self.deliveries.pop(frames[2], None)
            peer.credit += 1
            if payload is not None and op != b"A" and len(frames) == 4:
                queue = peer.queue if op == b"Y" else peer.queue + b".dead"
                self.ready.setdefault(queue, deque()).append((frames[2], frames[3]))
        elif op == b"R":
            for tag in reversed(frames[2:]):
                payload = peer.inflight.pop(tag, None)
                if payload is not None:  # given back unprocessed: not counted as a delivery
                    self.deliveries[tag] = self.deliveries.get(tag, 1) - 1
                    self.ready.setdefault(peer.queue, deque()).appendleft((tag, payload))
            self._drop(ident)

    def _drop(self, ident: bytes) -> None:
        peer = self.peers.pop(ident)
        q = self.ready.setdefault(peer.queue, deque())
        for tag, payload in reversed(list(peer.inflight.items())):
            q.appendleft((tag, payload))

    def _expire(self) -> None:
        limit = time.monotonic() - self.s.lease
        for ident in [i for i, p in self.peers.items() if p.seen < limit]:
            n = len(self.peers[ident].inflight)
            self._drop(ident)
            if n:
                log.warning("zmq consumer silent for %.1fs: %d unacked message(s) go to other consumers",
                            self.s.lease, n)

    def _dispatch(self) -> None:
        for ident, peer in list(self.peers.items()):
            q = self.ready.get(peer.queue)
            while peer.credit > 0 and q:
                tag, payload = q.popleft()
                n = self.deliveries.get(tag, 0) + 1
                try:
                    self.router.send_multipart([ident, tag, b"%d" % n, payload], zmq.NOBLOCK)
                except zmq.ZMQError:
                    q.appendleft((tag, payload))
                    break
                self.deliveries[tag] = n
                peer.inflight[tag] = payload
                peer.credit -= 1


class AckReceiver:
    """The consumer side: one DEALER connected to the producer, with credit = prefetch."""

    def __init__(self, s: Settings, queue: str, prefetch: int) -> None:
        self.s = s
        self.sock = socket(s, zmq.DEALER, s.queue_addr, bind=False)
        self.sock.linger = min(s.linger_ms, 1000)
        self.beat_every = s.lease / 3
        self.join = [b"C", queue.encode(), b"%d" % prefetch]
        self.send(*self.join)

    def lapsed(self) -> bool:
        """Silent for (nearly) a lease: the producer gives, or gave, what this consumer holds to others."""
        return time.monotonic() - self.last_beat > self.s.lease * 0.9

    def rejoin(self) -> None:
        self.send(*self.join)

    def receive(self, timeout: float | None) -> tuple[bytes, int, bytes] | None:
        now = time.monotonic()
        if now - self.last_beat >= self.beat_every:
            self.beat()
        wait = self.beat_every if timeout is None else min(timeout, self.beat_every)
        if not self.sock.poll(int(wait * 1000)):
            return None
        tag, n, payload = self.sock.recv_multipart(zmq.NOBLOCK)
        return tag, int(n), payload

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))
        self.last_beat = time.monotonic()

    def beat(self) -> None:
        self.send(b"H")

    def close(self, unsettled: list[bytes]) -> None:
        try:
            self.sock.send_multipart([b"R", *unsettled], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the producer is gone: its lease expiry returns them
        self.sock.close()
