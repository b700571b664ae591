"""``beanstalk://host[:port][,host2[:port2]...][?ttr=SECONDS]``: beanstalkd via greenstalk.

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
"""

from __future__ import annotations

import dataclasses
import math
import select
import socket
import struct
import threading
import time
from collections import OrderedDict
from typing import ClassVar

import greenstalk

from ..backend import (
    NATIVE,
    UNSUPPORTED,
    Backend,
    Capabilities,
    DeadLetterStore,
    Delivery,
    Destination,
    Queue,
    Status,
    Subscription,
    Topic,
)
from ..errors import ConfigurationError, MessageTooLarge, UnsupportedError
from ..url import URL
from ._beanstalk_dead import BuriedStore

DEFAULT_PORT = 11300
DEFAULT_TTR = 60
_PRI_BASE = 1024
_TUBE_MAX = 195
_CONNECT_TIMEOUT = 5.0
_IO_TIMEOUT = 30.0  # a hung server surfaces as a connection error (waiting reserves are read only once answered)
_POLL_MAX = 0.02  # longest pause between polls while a consumer holds jobs
_WAIT = 3600  # seconds a waiting reserve may stay on the server (it is read again, not resent)
_STATUS_KEEP = 50_000

CAPABILITIES = Capabilities(
    name="beanstalk",
    topic=UNSUPPORTED,
    priority=NATIVE,
    delay=NATIVE,
    retry=NATIVE,
    dead_letter=NATIVE,
    status=NATIVE,
    confirmed_send=True,
    persistent=True,
    guarantee="at-least-once",
    max_message_size=65_535,
    size_limit_hint="start beanstalkd with -z BYTES to raise its 65,535-byte default job size",
    notes="persistent only with a binlog (beanstalkd -b DIR); delays in whole seconds; "
    "status for messages sent by this process",
)

Key = tuple[str, int, int]  # (host, port, job id)


class _StatusMap:
    """Message id <-> job id for messages this process sent (bounded, oldest forgotten)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # an OrderedDict: popping the oldest of a plain dict rescans its deleted slots (O(n))
        self.by_id: OrderedDict[str, Key] = OrderedDict()
        self.by_job: dict[Key, str] = {}

    def put(self, mid: str, key: Key) -> None:
        with self.lock:
            old = self.by_id.pop(mid, None)  # an id sent again
            if old is not None:
                self.by_job.pop(old, None)
            self.by_id[mid] = key
            self.by_job[key] = mid
            if len(self.by_id) > _STATUS_KEEP:
                self.by_job.pop(self.by_id.popitem(last=False)[1], None)

    def moved(self, old: Key, new: Key) -> None:
        with self.lock:
            mid = self.by_job.pop(old, None)
            if mid is not None:
                self.by_id[mid] = new
                self.by_job[new] = mid

    def get(self, mid: str) -> Key | None:
        with self.lock:
            return self.by_id.get(mid)


_status_map = _StatusMap()


def _pri(priority: int | None) -> int:
    return _PRI_BASE + 9 - (priority or 0)


def _secs(delay: float | None) -> int:
    return math.ceil(delay) if delay and delay > 0 else 0


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


def _connect(host: str, port: int, use: str | None = None, watch: str | None = None) -> "greenstalk.Client[bytes]":
    sock = socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT)
    try:
        # a blocking socket with kernel-side timeouts: Python's own socket timeout would add
        # a poll() before every send and receive (measured: ~0.6x the throughput)
        sock.settimeout(None)
        tv = struct.pack("ll", int(_IO_TIMEOUT), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return greenstalk.Client(sock, encoding=None, use=use or "default", watch=watch or "default")
    except BaseException:
        sock.close()
        raise


class BeanstalkBackend(Backend):
    capabilities = CAPABILITIES
    # greenstalk raises ConnectionError('Unexpected EOF') (an OSError) on a lost server, and
    # asserts on a reply cut mid-line
    connection_errors = (OSError, AssertionError)
    url_params: ClassVar[frozenset[str]] = frozenset({"ttr"})

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
        self.client: greenstalk.Client[bytes] | None = None
        self.used = "default"

    def open(self) -> None:
        self.client = _connect(self.host, self.port)
        limit = int(self.client.stats()["max-job-size"])
        if limit != CAPABILITIES.max_message_size:
            hint = f"this server was started with -z {limit}; {CAPABILITIES.size_limit_hint}"
            self.capabilities = dataclasses.replace(CAPABILITIES, max_message_size=limit, size_limit_hint=hint)

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
        tube = _tube(destination)
        if tube != self.used:
            c.use(tube)
            self.used = tube
        job = c.put(payload, _PRI_BASE + 9 - (priority or 0), math.ceil(delay) if delay else 0, self.ttr)
        _status_map.put(message_id, (self.host, self.port, job))

    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        tube = _tube(destination)
        return _BeanstalkSub(self, tube, _connect(self.host, self.port, use=tube, watch=tube))

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

    def dead_letter_store(self, queue: str) -> DeadLetterStore | None:
        return BuriedStore(lambda: _connect(self.host, self.port, watch=f"{queue}.dead"), queue)


class _BeanstalkSub(Subscription):
    """A tube on its own connection: reserved jobs belong to the connection that reserved them."""

    def __init__(self, backend: BeanstalkBackend, tube: str, client: "greenstalk.Client[bytes]") -> None:
        self.destination = Queue(tube)
        self.retry_target = Queue(tube)
        self.dead_target = Queue(f"{tube}.dead")
        self.tube = tube
        self.c = client
        self.used = tube
        self.host, self.port, self.ttr = backend.host, backend.port, backend.ttr
        self.max_size = backend.capabilities.max_message_size or CAPABILITIES.max_message_size or 0
        self.held: set[int] = set()  # ids of the jobs this connection holds, unsettled
        self.pending = False  # a reserve sent, its answer not read yet

    # Waiting: a reserve left waiting on the server holds up every later command on its
    # connection (delete, bury) until it answers, and beanstalkd counts reserve timeouts in
    # whole seconds. So a consumer that holds no job sends one long reserve and waits for
    # the answer on the socket (no traffic while idle, no delay when a job comes); one that
    # holds jobs it may still settle polls with reserve-with-timeout 0 and a short pause.
    # greenstalk cannot send a command and read its answer later: the pending reserve uses
    # its socket and reader directly.
    def receive(self, timeout: float | None) -> Delivery | None:
        if self.pending:
            return self._await(timeout)
        if timeout is not None and timeout <= 0 or self.held:
            return self._poll(timeout)
        return self._await(timeout)

    def _got(self, job: "greenstalk.Job[bytes]") -> Delivery:
        self.held.add(job.id)
        return Delivery(job.body, job)

    def _poll(self, timeout: float | None) -> Delivery | None:
        reserve = self.c.reserve
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while True:
            try:  # the hot path: one round trip when a job is ready
                return self._got(reserve(0))
            except (greenstalk.TimedOutError, greenstalk.DeadlineSoonError):
                pass  # DEADLINE_SOON: a job we hold is about to time out; nothing new for now
            left = _POLL_MAX if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MAX)

    def _await(self, timeout: float | None) -> Delivery | None:
        c = self.c
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self.pending:
                c._sock.sendall(b"reserve-with-timeout %d\r\n" % _WAIT)
                self.pending = True
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not select.select([c._sock], [], [], left)[0]:
                return None
            self.pending = False
            try:
                jid, size = (int(n) for n in greenstalk._parse_response(c._reader.readline(), b"RESERVED"))
            except greenstalk.TimedOutError:
                continue  # _WAIT seconds without a job: wait again
            except greenstalk.DeadlineSoonError:
                return None
            return self._got(greenstalk.Job(jid, c._read_chunk(size)))

    def _settling(self) -> "greenstalk.Client[bytes]":
        if self.pending:  # never expected: a pending reserve is only sent while no job is held
            raise ConnectionError("a reserve is still pending on this connection")
        return self.c

    def ack(self, delivery: Delivery) -> None:
        try:
            self._settling().delete(delivery.tag)
        finally:
            self.held.discard(delivery.tag.id)

    def _stats(self, job: "greenstalk.Job[bytes]") -> tuple[int, int]:
        st = self._settling().stats_job(job)
        return int(st["pri"]), int(st["ttr"])

    def requeue(self, delivery: Delivery) -> None:
        try:
            pri, _ = self._stats(delivery.tag)
            self.c.release(delivery.tag, pri, 0)
        finally:
            self.held.discard(delivery.tag.id)

    def _put(self, tube: str, payload: bytes, pri: int, delay: int, ttr: int) -> int:
        if tube != self.used:
            self.c.use(tube)
            self.used = tube
        return self.c.put(payload, pri, delay, ttr)

    def retry(self, delivery: Delivery, payload: bytes, delay: float) -> None:
        job = delivery.tag
        pri, ttr = self._stats(job)
        if len(payload) > self.max_size:  # the message stays pending: dead_letter() still works
            raise MessageTooLarge(
                f"the retried message is {len(payload):,} bytes with its attempt and error, over the "
                f"beanstalkd server's job size limit of {self.max_size:,} bytes"
            )
        try:
            new = self._put(self.tube, payload, pri, _secs(delay), ttr)
            self.c.delete(job)
        finally:
            self.held.discard(job.id)
        _status_map.moved((self.host, self.port, job.id), (self.host, self.port, new))

    def dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        job = delivery.tag
        try:
            pri, ttr = self._stats(job)
            if len(payload) > self.max_size:
                self.c.bury(job, pri)  # buried in place, without the reason (see the module doc)
                return
            new = self._put(self.dead_target.name, payload, pri, 0, ttr)
            self.c.bury(self.c.reserve_job(new), pri)
            self.c.delete(job)
        finally:
            self.held.discard(job.id)
        _status_map.moved((self.host, self.port, job.id), (self.host, self.port, new))

    def close(self) -> None:
        try:
            self.c.close()  # beanstalkd returns this connection's reserved jobs to ready at once
        except OSError:
            pass
