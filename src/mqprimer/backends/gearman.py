"""``gearman://host[:port][,host2[:port2]...][?timeout=SECONDS&io_timeout=SECONDS]``: gearmand, background jobs.

Queue-only: a Gearman function is a queue, a background job a message. How mqprimer maps
onto gearmand 1.1 (docs/backend-gearman.md has the measurements behind each line):

- send = ``SUBMIT_JOB_*_BG``, returning once gearmand answered ``JOB_CREATED``. The job's
  unique is the message id, so a re-send of a queued or running message (after a lost
  reply, or by failover) joins the existing job instead of making a second one.
- priority: two levels. 0-4 (and none) = normal, 5-9 = high. gearmand's low level is not
  used: a delayed job (``SUBMIT_JOB_EPOCH``, always normal priority) that is not due yet
  stops gearmand from handing out any *low* job of its function until it is.
- delay: native, ``SUBMIT_JOB_EPOCH`` at the next whole second at or after the delay
  (never early). gearmand wakes no sleeping worker when such a job falls due, so an idle
  consumer asks once a second. A delay with a high priority is refused.
- consuming: ``GRAB_JOB_UNIQ``; ``prefetch`` jobs held at once at most; an idle consumer
  sleeps (``PRE_SLEEP``) until gearmand wakes it (``NOOP``). A worker connection that
  drops gives its jobs back (at-least-once).
- ack = ``WORK_COMPLETE``, confirmed by the answer to the next request on the connection
  (gearmand answers in order and says nothing on success). Retry and dead letters are
  emulated by the portable layer (a copy, then the ack): ``WORK_FAIL`` is final and
  gearmand's ``--job-retries`` drops jobs silently. Dead letters are jobs of
  ``<queue>.dead``. requeue = a copy, then the ack.
- ``?timeout=N``: gearmand takes a held job back after N seconds (``CAN_DO_TIMEOUT``) and
  gives it to another worker; the late ack of the first worker is refused. The lease
  cannot be renewed, so ``touch()`` is refused then. Without it a hung handler keeps its
  job until its connection drops.
- ``?io_timeout=S`` (default 30): how long gearmand may leave a request unanswered before the
  connection counts as lost (a hung gearmand surfaces as ConnectionFailed, then reconnects).
- request/reply: native. ``conn.request`` is a foreground ``SUBMIT_JOB`` (unique ``rq:<id>``)
  on the connection's reply path; the service's reply is the job's ``WORK_COMPLETE`` data,
  sent by the ack on the worker connection that holds the job (one WORK_COMPLETE: a second
  reply is refused). A raw worker's ``WORK_FAIL`` (gearmand 1.1.20 also sends it for
  ``WORK_EXCEPTION``, to clients that did not ask for exceptions) reaches the caller as
  RemoteError. A retried request's copy is a background job: its caller gets no reply.
- status: ``GET_STATUS_UNIQUE`` by message id, from any process (delayed shows as ready
  except in the process that sent it; done and unknown are the same: gearmand forgets).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import select
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import ClassVar

from .._ids import prepare, stamp
from ..backend import (
    EMULATED,
    NATIVE,
    UNSUPPORTED,
    Backend,
    Capabilities,
    Destination,
    NotNow,
    Outgoing,
    Queue,
    QueueStats,
    ReplyPath,
    Status,
    Subscription,
    Topic,
)
from ..envelope import encode, make
from ..errors import ConfigurationError, UnsupportedError
from ..url import URL
from . import _gearman_aio as aio_io
from . import _gearman_proto as gp
from ._gearman_proto import GearmanError, Link, other_unique, packet
from ._gearman_sub import GearmanSub

DEFAULT_PORT = 4730
_CONNECT_TIMEOUT = 5.0
_IO_TIMEOUT = 30.0
_PIPELINE = 500  # submits per write in publish_many
_DELAYED_KEEP = 50_000
_FUNC_MAX = 512 - len(".dead")  # gearmand's function name limit, less the dead-letter suffix

CAPABILITIES = Capabilities(
    name="gearman",
    topic=UNSUPPORTED,
    priority=NATIVE,
    priority_levels=2,
    delay=NATIVE,
    retry=EMULATED,
    dead_letter=EMULATED,
    status=NATIVE,
    # foreground jobs: the reply is the WORK_COMPLETE data (GearmanReplyPath)
    request_reply=NATIVE,
    # the text admin protocol's `status`: queued (ready counts delayed jobs too: gearmand does
    # not tell them apart), running (reserved), available workers (consumers)
    stats=NATIVE,
    confirmed_send=True,
    persistent=True,
    guarantee="at-least-once",
    notes="persistent only with a persistent queue (gearmand -q libsqlite3 ...); two priority levels "
    "(0-4 normal, 5-9 high); delays in whole seconds; status by message id from any process",
    # receive(0.0) hands out a job grabbed already and writes a grab only if the socket takes
    # it at once (GearmanSub.receive_nowait); ack waits for gearmand's answer: not declared
    nowait=("poll",),
)

_SUBMIT = {0: gp.SUBMIT_JOB_BG, 1: gp.SUBMIT_JOB_HIGH_BG}  # priority band -> command
ERROR_TYPE = "mqprimer.error"  # consumer.ERROR_TYPE (not imported: drivers stay below the portable layer)
FOREGROUND = "gearman:foreground"  # a request's reply address: its own job (no queue, no name)


class GearmanReplyPath(ReplyPath):
    """Requests are foreground jobs (``SUBMIT_JOB``) on this connection; gearmand sends
    their ``WORK_COMPLETE`` (the reply) back on it. ``WORK_FAIL``/``WORK_EXCEPTION`` (a
    worker that is not mqprimer failing the job) and a refused submit become error replies.
    Nothing is left on the server: a foreground job ends with its client's connection.
    """

    address = FOREGROUND
    publishes_requests = True
    concurrent_requests = True  # the id is queued before the submit leaves, so the reader finds it

    def __init__(self, link: Link) -> None:
        self.link = link
        self.send_lock = threading.Lock()
        self.submitted: deque[str] = deque()  # message ids of submits not yet answered JOB_CREATED
        self.jobs: dict[bytes, str] = {}  # handle -> message id, until the job ends

    def request(self, destination: Queue, payload: bytes, *, message_id: str, ttl: float | None) -> None:
        # the unique makes a re-sent request join its job; "rq:" keeps it apart from background ones
        u = b"rq:" + base_unique(message_id)[: gp.MAX_UNIQUE - 3]
        data = packet(gp.SUBMIT_JOB, _function(destination), u, payload)
        with self.send_lock:
            self.submitted.append(message_id)
            self.link.send(data)

    def receive(self, timeout: float) -> bytes | None:
        link = self.link
        deadline = time.monotonic() + timeout
        while True:
            if not link.buffered():
                left = deadline - time.monotonic()
                if not select.select([link.sock], [], [], max(left, 0.0))[0]:
                    return None
            try:
                cmd, args = link.read()
            except GearmanError as exc:  # a refused SUBMIT_JOB: answered in order
                if not self.submitted:
                    raise
                return self._error(self.submitted.popleft(), f"gearmand refused the request: {exc}")
            if cmd == gp.JOB_CREATED:
                self.jobs[args[0]] = self.submitted.popleft()
            elif cmd == gp.WORK_COMPLETE:
                self.jobs.pop(args[0], None)
                if args[1]:  # empty: the service acked without replying; the caller times out
                    return args[1]
            elif cmd == gp.WORK_FAIL:
                # gearmand 1.1.20 turns a WORK_EXCEPTION into WORK_FAIL for a client that did not
                # ask for exceptions, with a NUL after the handle (measured)
                mid = self.jobs.pop(args[0].rstrip(b"\0"), None)
                if mid is not None:
                    return self._error(mid, "the gearman worker failed the job (WORK_FAIL)")
            elif cmd == gp.WORK_EXCEPTION:
                mid = self.jobs.pop(args[0], None)
                if mid is not None:
                    text = args[1][:2000].decode("utf-8", "replace")
                    return self._error(mid, f"the gearman worker failed the job (WORK_EXCEPTION): {text}")
            # WORK_DATA, WORK_WARNING, WORK_STATUS: progress, not the reply

    def _error(self, mid: str, reason: str) -> bytes:
        rid, now = stamp()
        return encode(make(id=rid, source="urn:mqprimer:gearman", type=ERROR_TYPE, body={"error": reason}, time=now,
                           reason=reason, correlation_id=mid))

    def close(self) -> None:
        self.link.close()  # gearmand drops this client's foreground jobs that no worker has taken


def _band(priority: int | None) -> int:
    return 1 if priority is not None and priority >= 5 else 0


def _function(dest: Destination) -> bytes:
    if type(dest) is Topic:
        raise UnsupportedError("the gearman backend does not support publish-subscribe (Topic destinations)")
    name = dest.name.encode()
    if len(name) > _FUNC_MAX:
        raise UnsupportedError(f"the gearman backend cannot use queue {dest.name!r}: over {_FUNC_MAX} bytes")
    return name


def base_unique(message_id: str) -> bytes:
    """The job unique for a message id: the id itself when it fits, else a digest of it.

    Room is kept for the suffixes below; ``-`` alone means "dedupe by data" to gearmand.
    """
    u = message_id.encode()
    if len(u) > gp.MAX_UNIQUE - 6 or b"\0" in u or u == b"-" or u.endswith((b"~", b"!dead")):
        u = b"h:" + hashlib.sha1(u).hexdigest().encode()
    return u


def _unique(message_id: str, fn: bytes) -> bytes:
    # GET_STATUS_UNIQUE looks a unique up in every function: a dead letter's differs
    u = base_unique(message_id)
    return u + b"!dead" if fn.endswith(b".dead") else u


class GearmanBackend(Backend):
    capabilities = CAPABILITIES
    connection_errors = (OSError,)  # socket errors, EOF and gp.ProtocolError (a ConnectionError)
    url_params: ClassVar[frozenset[str]] = frozenset({"timeout", "io_timeout"})

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        if len(url.hosts) > 1:  # connect() splits host lists into one endpoint per host
            raise ConfigurationError(f"{url}: one backend serves one host; use mqprimer.connect() for a host list")
        self.host = url.host or "127.0.0.1"
        self.port = url.port or DEFAULT_PORT
        raw = url.param("timeout", "") or ""
        if raw and (not raw.isdigit() or not 1 <= int(raw) <= 2**31 - 1):
            raise ConfigurationError(f"{url}: timeout must be a whole number of seconds >= 1, got {raw!r}")
        self.job_timeout = int(raw) if raw else None
        self.io_timeout = url.seconds("io_timeout", _IO_TIMEOUT)
        self.link: Link | None = None
        self.aio_busy = False  # a publish_async is out on the event loop
        # (function, unique) of the jobs this backend's subscriptions hold: a copy of one of
        # them (retry, requeue) needs another unique, or gearmand would merge the two
        self.held: set[tuple[bytes, bytes]] = set()
        self.delayed: OrderedDict[bytes, float] = OrderedDict()  # unique -> due (epoch s)
        self.delayed_lock = threading.Lock()
        self.funcs: dict[Destination, bytes] = {}
        self.subs: weakref.WeakSet[GearmanSub] = weakref.WeakSet()  # where a reply finds its job

    def open(self) -> None:
        self.link = Link(self.host, self.port, min(_CONNECT_TIMEOUT, self.io_timeout), self.io_timeout)
        self.link.send(packet(gp.ECHO_REQ, b"mqprimer"))  # a real round trip before "connected"
        self.link.read()

    def close(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()

    def _link(self) -> Link:
        if self.link is None:
            raise ConnectionError("not connected")
        return self.link

    def _fn(self, dest: Destination) -> bytes:
        fn = self.funcs.get(dest)
        if fn is None:
            fn = _function(dest)
            if len(self.funcs) < 10_000:
                self.funcs[dest] = fn
        return fn

    def _submit(self, dest: Destination, payload: bytes, mid: str, priority: int | None, delay: float | None) -> bytes:
        fn = self._fn(dest)
        u = _unique(mid, fn)
        if self.held and (fn, u) in self.held:
            u = other_unique(u)
        if delay:
            if _band(priority):
                raise UnsupportedError(
                    "the gearman backend cannot delay a high-priority message: gearmand schedules "
                    "delayed jobs (SUBMIT_JOB_EPOCH) at normal priority only; send it without priority or delay"
                )
            due = math.ceil(time.time() + delay)
            with self.delayed_lock:
                self.delayed[u] = due
                if len(self.delayed) > _DELAYED_KEEP:
                    self.delayed.popitem(last=False)
            return packet(gp.SUBMIT_JOB_EPOCH, fn, u, b"%d" % due, payload)
        return packet(_SUBMIT[_band(priority)], fn, u, payload)

    def publish(
        self, destination: Destination, payload: bytes, *, message_id: str,
        priority: int | None = None, delay: float | None = None, ttl: float | None = None,
    ) -> None:
        # ttl is the envelope's expiry, checked on receive
        link = self._link()
        link.send(self._submit(destination, payload, message_id, priority, delay))
        prepare()  # the next message id, made while gearmand works (see _ids.py)
        link.read()  # JOB_CREATED, or GearmanError

    async def publish_async(self, destination: Destination, payload: bytes, *, message_id: str) -> None:
        # publish() on the event loop (backend.py's asyncio SPI; why: _gearman_aio.py)
        link = self.link
        if link is None or self.aio_busy or link.buf:
            raise NotNow("not connected, busy, or answers unread: the blocking publish")
        self.aio_busy = True  # the endpoint's lock is an RLock: another task on the loop would get it too
        try:
            await aio_io.send(link, self._submit(destination, payload, message_id, None, None))
            prepare()  # the next message id, made while gearmand works (as publish)
            deadline = asyncio.get_running_loop().time() + link.io_timeout
            while not link.buffered():
                await aio_io.fill(link, deadline)
            link.read()  # JOB_CREATED, or GearmanError (in step)
        except GearmanError:
            raise
        except BaseException:  # also cancelled with the answer unread: nothing else can use the link
            aio_io.drop(link)
            raise
        finally:
            self.aio_busy = False

    def publish_many(self, items: Sequence[Outgoing]) -> None:
        """Pipelined: up to ``_PIPELINE`` submits per write, then their answers in order.

        Every answer is read even after an error, so the connection stays in step; the
        first error is raised. A batch is not atomic: the jobs before a refused one are in.
        """
        link = self._link()
        for start in range(0, len(items), _PIPELINE):
            batch = items[start : start + _PIPELINE]
            link.send(b"".join(self._submit(i.destination, i.payload, i.message_id, i.priority, i.delay)
                               for i in batch))
            error: GearmanError | None = None
            for _ in batch:
                try:
                    link.read()
                except GearmanError as exc:
                    error = error or exc
            if error is not None:
                raise error

    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        fn = _function(destination)
        link = Link(self.host, self.port, min(_CONNECT_TIMEOUT, self.io_timeout), self.io_timeout)
        try:
            if self.job_timeout:
                link.send(packet(gp.CAN_DO_TIMEOUT, fn, b"%d" % self.job_timeout))
            else:
                link.send(packet(gp.CAN_DO, fn))
        except BaseException:
            link.close()
            raise
        sub = GearmanSub(fn, link, prefetch, self.held, float(self.job_timeout) if self.job_timeout else None)
        self.subs.add(sub)
        return sub

    def reply_path(self, name: str) -> ReplyPath:
        return GearmanReplyPath(self._link())

    def send_reply(self, address: str, payload: bytes, *, message_id: str, ttl: float | None,
                   correlation_id: str | None = None) -> None:
        if address != FOREGROUND:  # a reply queue (an older mqprimer's, or a hand-made request)
            self.publish(Queue(address), payload, message_id=message_id)
            return
        if correlation_id is None:
            raise UnsupportedError(
                "a gearman foreground job is answered by its WORK_COMPLETE, on the worker connection that "
                "holds it: reply with message.reply() on the received request"
            )
        handle = correlation_id.encode()
        for sub in list(self.subs):
            if sub.reply(handle, payload):
                return
        # not held here any more (its connection was lost): gearmand gives the job to a worker
        # again, whose reply answers it; this one has nowhere to go

    def delete_queue(self, name: str) -> None:
        # gearmand forgets a function with no jobs and no workers: complete what is left in it
        sub = self.subscribe(Queue(name), prefetch=64)
        try:
            for _ in range(10_000):
                d = sub.receive(0.2)  # a grab's answer, on loopback within milliseconds
                if d is None:
                    break
                sub.ack(d)
        finally:
            sub.close()

    def status(self, message_id: str) -> Status:
        link = self._link()
        u = base_unique(message_id)
        asked = (u, other_unique(u), u + b"!dead")
        link.send(b"".join(packet(gp.GET_STATUS_UNIQUE, a) for a in asked))
        known: dict[bytes, bool] = {}  # unique -> running
        for want in asked:
            _, args = link.read()
            if args[0] != want:
                raise gp.ProtocolError("STATUS_RES_UNIQUE out of order")
            if args[1] == b"1":
                known[want] = args[2] == b"1"
        for q in asked[:2]:
            if q in known:
                if known[q]:
                    return Status.RESERVED
                with self.delayed_lock:
                    due = self.delayed.get(q)
                return Status.DELAYED if due is not None and due > time.time() else Status.READY
        return Status.DEAD if asked[2] in known else Status.UNKNOWN

    def stats(self, destination: Queue) -> QueueStats:
        fn = _function(destination)
        link = self._link()
        if link.buf:
            raise gp.ProtocolError("a text command with binary replies still unread")
        link.send(b"status\n")
        while True:  # one line per function, then a line with a single dot
            end = (b"\n" + bytes(link.buf)).find(b"\n.\n")
            if end >= 0:
                break
            link.fill()
        text, link.buf = bytes(link.buf[:end]), bytearray(link.buf[end + 2:])
        rows: dict[bytes, tuple[int, int, int]] = {}
        for line in text.split(b"\n"):
            parts = line.rsplit(b"\t", 3)
            if len(parts) == 4:
                rows[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
        total, running, workers = rows.get(fn, (0, 0, 0))
        return QueueStats(destination.name, ready=total - running, delayed=None, reserved=running,
                          dead=rows.get(fn + b".dead", (0, 0, 0))[0], consumers=workers)

    def server_info(self) -> dict[str, str]:
        """What gearmand says about itself, for ``mqprimer doctor``."""
        link = self._link()
        version = link.text(b"version").decode("utf-8", "replace")
        pid = link.text(b"getpid").decode("utf-8", "replace")
        return {
            "server": f"gearmand {version.removeprefix('OK ')} (pid {pid.removeprefix('OK ')})",
            "persistence": "unknown: gearmand does not say which queue it keeps jobs in; send() is durable "
            "only with a persistent one (-q libsqlite3 --libsqlite3-db=FILE, or MySQL, Postgres, redis)",
        }
