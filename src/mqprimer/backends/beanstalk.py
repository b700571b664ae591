"""``beanstalk://host[:port][,host2[:port2]...][?ttr=SECONDS&io_timeout=SECONDS]``: beanstalkd via greenstalk.

Queue-only (a tube per queue). How mqprimer maps onto beanstalkd (docs/backend-beanstalk.md):

- priority: mqprimer ``p`` (0 lowest .. 9 most urgent) is beanstalkd ``1024 + 9 - p``
  (9 -> 1024, beanstalkd's customary default; 0 and no priority -> 1033).
- delay: native ``put``/retry delay, rounded *up* to whole seconds (never early).
- ack = ``delete``. retry = a delayed ``put`` of the rewritten job (attempt + 1) at the
  job's own priority and TTR, then ``delete`` of the original: ``release`` cannot change
  the body, and reading beanstalkd's ``reserves`` would cost a ``stats-job`` round trip
  on every delivery (it halves throughput). A crash between the two gives a duplicate.
- dead letter = ``bury``: the rewritten job (with reason and origin) is put in tube
  ``<queue>.dead``, reserved by id and buried there, then the original is deleted. Every
  job in ``<queue>.dead``, buried or (after a crash mid-way) ready, is a dead letter, so
  no step can lose a message or leak one back into the queue. A copy too large for the
  server is not made: the original is buried in place and listed too.
- TTR (``?ttr=``, default 60 s) is a lease; the TTL (expiry) is the portable check on receive.
- status: ``stats-job`` on the job id recorded when this process sent the message.
- ``io_timeout`` (seconds, default 30): how long the server may leave a command unanswered
  (a connection's handshake: at most 5 s) before the connection counts as lost.
- size: the server's ``max-job-size`` less 2 bytes. beanstalkd (1.12) stores a body with its
  CRLF and, replaying its binlog after a restart, refuses a record bigger than the limit: a
  job of the last 2 bytes is accepted and confirmed, but after a restart it is gone together
  with every later record of its binlog file (confirmed jobs lost, deleted ones back, job ids
  reused). No job that size is ever put (docs/backend-beanstalk.md).
"""

from __future__ import annotations

import dataclasses
import math
import socket
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, ClassVar

import greenstalk
from greenstalk import _parse_response

from .._ids import prepare
from ..backend import (
    EMULATED,
    NATIVE,
    UNSUPPORTED,
    Backend,
    Capabilities,
    DeadLetterStore,
    Destination,
    NotNow,
    Outgoing,
    Queue,
    QueueStats,
    Status,
    Subscription,
    Topic,
)
from ..errors import ConfigurationError, MessageTooLarge, UnsupportedError
from ..url import URL
from ._beanstalk_aio import put
from ._beanstalk_dead import BuriedStore
from ._beanstalk_sub import BeanstalkSub, Key, secs

DEFAULT_PORT = 11300
DEFAULT_TTR = 60
_PRI_BASE = 1024
_TUBE_MAX = 195
_CONNECT_TIMEOUT = 5.0
_IO_TIMEOUT = 30.0  # a hung server surfaces as a connection error (waiting reserves are read only once answered)
_STATUS_KEEP = 50_000
_PUT = b"put %d %d %d %d\r\n%b\r\n"  # priority, delay, TTR, size, body
_PIPELINE = 500  # commands per write in publish_many: their replies (~20 bytes each) fit socket buffers
# bytes of a server's max-job-size that a job must leave free: beanstalkd keeps the body's CRLF
# and its binlog replay refuses a record over the limit (see the module doc)
_CRLF = 2
_SERVER_MAX = 65_535  # beanstalkd's default -z

CAPABILITIES = Capabilities(
    name="beanstalk",
    topic=UNSUPPORTED,
    priority=NATIVE,
    delay=NATIVE,
    retry=NATIVE,
    dead_letter=NATIVE,
    status=NATIVE,
    request_reply=EMULATED,  # a private reply tube per connection, emptied when it closes
    stats=NATIVE,  # stats-tube of the tube and of its .dead tube
    confirmed_send=True,
    persistent=True,
    guarantee="at-least-once",
    max_message_size=_SERVER_MAX - _CRLF,
    size_limit_hint="its -z limit, 65,535 bytes by default, less 2 that beanstalkd needs to replay the job "
    "from its binlog; start beanstalkd with -z BYTES to raise it",
    notes="persistent only with a binlog (beanstalkd -b DIR); delays in whole seconds; "
    "status for messages sent by this process",
)

class _StatusMap:
    """Message id <-> job id for messages this process sent (bounded, oldest forgotten).

    ``send`` only appends to a bounded deque (atomic, and cheap on the hot path); the maps
    are brought up to date when a status is asked for or a job moves.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: deque[tuple[str, Key]] = deque(maxlen=_STATUS_KEEP)
        # an OrderedDict: popping the oldest of a plain dict rescans its deleted slots (O(n))
        self.by_id: OrderedDict[str, Key] = OrderedDict()
        self.by_job: dict[Key, str] = {}

    def _drain(self) -> None:  # with the lock held
        sent, by_id, by_job = self.sent, self.by_id, self.by_job
        while sent:
            mid, key = sent.popleft()
            old = by_id.pop(mid, None)  # an id sent again
            if old is not None:
                by_job.pop(old, None)
            by_id[mid] = key
            by_job[key] = mid
            if len(by_id) > _STATUS_KEEP:
                by_job.pop(by_id.popitem(last=False)[1], None)

    def moved(self, old: Key, new: Key) -> None:
        with self.lock:
            self._drain()
            mid = self.by_job.pop(old, None)
            if mid is not None:
                self.by_id[mid] = new
                self.by_job[new] = mid

    def get(self, mid: str) -> Key | None:
        with self.lock:
            self._drain()
            return self.by_id.get(mid)


_status_map = _StatusMap()
_record_sent = _status_map.sent.append


def _pri(priority: int | None) -> int:
    return _PRI_BASE + 9 - (priority or 0)


def _tube(dest: Destination) -> str:
    if type(dest) is Topic:
        raise UnsupportedError("the beanstalk backend does not support publish-subscribe (Topic destinations)")
    name = dest.name
    if ":" in name or len(name) > _TUBE_MAX:
        raise UnsupportedError(
            f"the beanstalk backend cannot use queue {name!r}: beanstalkd tube names have no ':' and at most "
            f"{_TUBE_MAX} characters here (200, less the '.dead' of the dead-letter tube)"
        )
    return name


def _too_big(size: int, limit: int) -> MessageTooLarge:
    return MessageTooLarge(
        f"a job of {size:,} bytes is over this beanstalkd server's limit of {limit:,} bytes (its -z limit less 2: "
        "beanstalkd accepts a job of the last 2 bytes but cannot replay it from its binlog after a restart)"
    )


def _connect(host: str, port: int, use: str | None = None, watch: str | None = None,
             io_timeout: float = _IO_TIMEOUT) -> "greenstalk.Client[bytes]":
    sock = socket.create_connection((host, port), timeout=min(_CONNECT_TIMEOUT, io_timeout))
    try:
        # a blocking socket with kernel-side timeouts: Python's own socket timeout would add
        # a poll() before every send and receive (measured: ~0.6x the throughput)
        sock.settimeout(None)
        # the handshake (use/watch, open()'s stats) gets the connect timeout: a hung server
        # would otherwise hold every reconnect attempt for the whole I/O timeout
        _io_timeout(sock, min(_CONNECT_TIMEOUT, io_timeout))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        client = greenstalk.Client(sock, encoding=None, use=use or "default", watch=watch or "default")
        if use or watch:
            _io_timeout(sock, io_timeout)
        return client
    except BaseException:
        sock.close()
        raise


def _io_timeout(sock: socket.socket, seconds: float) -> None:
    tv = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class BeanstalkBackend(Backend):
    capabilities = CAPABILITIES
    # greenstalk raises ConnectionError('Unexpected EOF') (an OSError) on a lost server, and
    # asserts on a reply cut mid-line
    connection_errors = (OSError, AssertionError)
    url_params: ClassVar[frozenset[str]] = frozenset({"ttr", "io_timeout"})
    lease_param = "ttr"

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        if len(url.hosts) > 1:  # connect() splits host lists into one endpoint per host
            raise ConfigurationError(f"{url}: one backend serves one host; use mqprimer.connect() for a host list")
        self.host = url.host or "127.0.0.1"
        self.port = url.port or DEFAULT_PORT
        ttr = url.param("ttr", str(DEFAULT_TTR)) or ""
        if not ttr.isdigit() or not 1 <= int(ttr) <= 2**32 - 1:
            raise ConfigurationError(f"{url}: ttr must be a whole number of seconds >= 1, got {ttr!r}")
        self.ttr = int(ttr)
        self.io_timeout = url.seconds("io_timeout", _IO_TIMEOUT)
        self.client: greenstalk.Client[bytes] | None = None
        self.used = "default"
        self.used_dest: Destination | None = None  # the destination last checked and used
        self.max_put = _SERVER_MAX - _CRLF  # the largest job put (set from the server's limit in open())
        self.reply_dests: dict[str, Queue] = {}  # reply address -> the Queue publish() last checked
        self.aio_busy = False  # a publish_async is out on the event loop

    def open(self) -> None:
        self.client = _connect(self.host, self.port, io_timeout=self.io_timeout)
        self.used, self.used_dest = "default", None
        server_max = int(self.client.stats()["max-job-size"])
        _io_timeout(self.client._sock, self.io_timeout)
        self.max_put = server_max - _CRLF
        if server_max != _SERVER_MAX:
            hint = (f"this server was started with -z {server_max}, less 2 that beanstalkd needs to replay "
                    "the job from its binlog; start beanstalkd with a larger -z BYTES to raise it")
            self.capabilities = dataclasses.replace(CAPABILITIES, max_message_size=self.max_put, size_limit_hint=hint)

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close()
            except OSError:
                pass

    def _client(self) -> "greenstalk.Client[bytes]":
        if self.client is None:
            raise ConnectionError("not connected")
        return self.client

    def publish(
        self, destination: Destination, payload: bytes, *, message_id: str,
        priority: int | None = None, delay: float | None = None, ttl: float | None = None,
    ) -> None:
        # ttl is the envelope's expiry, checked on receive; it is never the TTR (a lease)
        c = self.client
        if c is None:
            raise ConnectionError("not connected")
        if len(payload) > self.max_put:  # also replies, which the portable layer checks only against its own limit
            raise _too_big(len(payload), self.max_put)
        if destination is not self.used_dest:
            tube = _tube(destination)
            if tube != self.used:
                c.use(tube)
                self.used = tube
            self.used_dest = destination
        # greenstalk's put, minus a copy of the job and a split of the reply: the send path
        # is measured against raw greenstalk and every step counts (docs/backend-beanstalk.md)
        c._sock.sendall(_PUT % (  # _pri() and secs(), inlined
            _PRI_BASE + 9 - (priority or 0), math.ceil(delay) if delay else 0, self.ttr, len(payload), payload,
        ))
        prepare()
        line = c._reader.readline()
        if line[:9] == b"INSERTED " and line[-1:] == b"\n":
            job = int(line[9:])
        else:  # an error reply, EOF or a line cut short: greenstalk's own exceptions
            job = int(_parse_response(line, b"INSERTED")[0])
        _record_sent((message_id, (self.host, self.port, job)))

    async def publish_async(self, destination: Destination, payload: bytes, *, message_id: str) -> None:
        # the asyncio twin's plain send (backend.py): after a blocking publish checked and used the tube
        c = self.client
        if c is None or destination is not self.used_dest or len(payload) > self.max_put or self.aio_busy:
            raise NotNow("not connected, another tube, too large, or busy: the blocking publish")
        self.aio_busy = True  # the endpoint's lock is an RLock: another task on the loop would get it too
        try:
            job = await put(c._sock, _PUT % (_PRI_BASE + 9, 0, self.ttr, len(payload), payload), self.io_timeout)
        finally:
            self.aio_busy = False
        prepare()
        _record_sent((message_id, (self.host, self.port, job)))

    def publish_many(self, items: Sequence[Outgoing]) -> None:
        """Pipelined: up to ``_PIPELINE`` commands in one write, then their replies in order.

        beanstalkd answers commands in order; every reply is read even after an error reply,
        so the connection stays in step, and the first error is raised. A batch is not
        atomic: the jobs before a failed one are in.
        """
        c = self._client()
        for it in items:  # before anything is written: a refusal mid-batch would leave `use` out of step
            if len(it.payload) > self.max_put:
                raise _too_big(len(it.payload), self.max_put)
        for start in range(0, len(items), _PIPELINE):
            batch = items[start : start + _PIPELINE]
            out: list[bytes] = []
            expect: list[tuple[bytes, Outgoing | None]] = []  # (reply, the message a put carried)
            for it in batch:
                tube = _tube(it.destination)
                if tube != self.used:
                    out.append(b"use %b\r\n" % tube.encode("ascii"))
                    expect.append((b"USING", None))
                    self.used, self.used_dest = tube, None
                out.append(_PUT % (
                    _pri(it.priority), secs(it.delay), self.ttr, len(it.payload), it.payload,
                ))
                expect.append((b"INSERTED", it))
            c._sock.sendall(b"".join(out))
            error: Exception | None = None
            for reply, sent in expect:
                try:
                    values = _parse_response(c._reader.readline(), reply)
                except greenstalk.Error as exc:  # a refused command: keep reading the rest
                    error = error or exc
                    continue
                if sent is not None:
                    _record_sent((sent.message_id, (self.host, self.port, int(values[0]))))
            if error is not None:
                raise error

    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        tube = _tube(destination)
        client = _connect(self.host, self.port, use=tube, watch=tube, io_timeout=self.io_timeout)
        return BeanstalkSub(tube, client, self.host, self.port, self.ttr, self.io_timeout, self.max_put,
                            _status_map.moved)

    def send_reply(self, address: str, payload: bytes, *, message_id: str, ttl: float | None) -> None:
        # one Queue per address, so publish() skips its tube checks for replies to the same caller
        dest = self.reply_dests.get(address)
        if dest is None:
            if len(self.reply_dests) >= 256:
                self.reply_dests.clear()
            dest = self.reply_dests[address] = Queue(address)
        self.publish(dest, payload, message_id=message_id, ttl=ttl)

    def delete_queue(self, name: str) -> None:
        # a tube exists while watched or not empty: deleting the late replies left in a reply
        # tube makes it vanish (at most a few: each request gets one reply)
        c = self._client()
        c.use(name)
        self.used, self.used_dest = name, None
        for peek in (c.peek_ready, c.peek_delayed, c.peek_buried):
            for _ in range(10_000):
                try:
                    c.delete(peek())
                except greenstalk.NotFoundError:
                    break

    def status(self, message_id: str) -> Status:
        key = _status_map.get(message_id)
        if key is None or key[:2] != (self.host, self.port):
            return Status.UNKNOWN
        try:
            st = self._client().stats_job(key[2])
        except greenstalk.NotFoundError:
            return Status.UNKNOWN  # deleted: acked, dropped as expired, or purged
        if st["state"] == "buried" or st["tube"].endswith(".dead"):
            return Status.DEAD
        return {"ready": Status.READY, "delayed": Status.DELAYED, "reserved": Status.RESERVED}.get(
            st["state"], Status.UNKNOWN
        )

    def stats(self, destination: Queue) -> QueueStats:
        tube = _tube(destination)
        c = self._client()
        counts: list[dict[str, Any]] = []
        for name in (tube, f"{tube}.dead"):
            try:
                counts.append(dict(c.stats_tube(name)))
            except greenstalk.NotFoundError:  # a tube exists only while watched or not empty
                counts.append({})
        own, dead = ({k: int(v) for k, v in st.items() if k.startswith("current-")} for st in counts)
        # every job in the .dead tube is a dead letter (ready ones: a crash between put and bury)
        dead_jobs = sum(dead.get(f"current-jobs-{k}", 0) for k in ("ready", "delayed", "reserved", "buried"))
        return QueueStats(destination.name, ready=own.get("current-jobs-ready", 0),
                          delayed=own.get("current-jobs-delayed", 0), reserved=own.get("current-jobs-reserved", 0),
                          dead=dead_jobs + own.get("current-jobs-buried", 0), consumers=own.get("current-watching", 0),
                          enqueued=counts[0].get("total-jobs", 0), dequeued=counts[0].get("cmd-delete", 0))

    def dead_letter_store(self, queue: str) -> DeadLetterStore | None:
        return BuriedStore(lambda: _connect(self.host, self.port, watch=f"{queue}.dead"), queue)
