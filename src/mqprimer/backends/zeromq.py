"""``zmq+tcp://HOST:PORT`` and ``zmq+ipc:///PATH``: ZeroMQ via pyzmq. No broker: sockets.

How mqprimer maps onto ZeroMQ (docs/backend-zeromq.md has the diagrams):

- A queue is a PUSH/PULL pipeline on the URL's address (fair queuing across the PULL
  peers); a topic is PUB/SUB on a second address (``PORT+1``, ``?pub_port=``; ipc:
  ``PATH.pub``). One frame per message: ``name NUL envelope``. SUB filters are byte
  prefixes, so a topic subscription filters on ``name NUL`` (``orders`` never matches
  ``ordersX``); ``*``/``#`` patterns subscribe to their literal prefix and match the rest
  here, exactly (declared emulated).
- Who binds is explicit: ``?bind=consumer`` (default: PULL binds, PUSH connects, so a
  producer can send before its consumer exists: a connecting PUSH queues in its pipe up
  to ``hwm``), ``bind=producer`` (one producer, many workers: the classic ventilator) or
  ``bind=none`` (both connect to a ``mqprimer zmq-device``). Topics: the publisher binds
  and subscribers connect, except with ``bind=none`` (a forwarder device in between): a
  bound SUB never saw a connecting PUB's first messages here.
- Every connection of one process that uses one address shares one socket (a second bind
  of the same address would fail), and messages read from it wait in this process for
  whichever local consumer takes their queue. ack removes nothing (the message left the
  network when it was read); an unsettled message goes back to this process's buffer on
  close and is lost with the process. retry puts the new copy back into that buffer;
  dead letters are kept in this process (``conn.dead_letters(q)``), bounded, lost with it.
- At-most-once, not persistent, no confirmation. PUB drops while a subscriber joins and at
  the HWM; the first publish of a socket waits up to ``join`` seconds for a subscriber.
- ``?ack=1``: acknowledged mode (``_zmq_link``): the producer binds a ROUTER and keeps each
  message until a consumer acks it; at-least-once while the producer process lives.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import ClassVar

import zmq

from ..backend import (
    EMULATED,
    NATIVE,
    UNSUPPORTED,
    Backend,
    Capabilities,
    DeadLetterStore,
    Delivery,
    Destination,
    Outgoing,
    Queue,
    ReplyPath,
    Subscription,
    Topic,
)
from ..envelope import decode, encode, replace
from ..errors import EnvelopeError, UnsupportedError
from ..topics import matches
from ..url import URL
from . import _zmq_link as link

log = logging.getLogger("mqprimer")
_SLICE = 0.05  # longest one reader holds a shared socket while waiting
_BATCH = 512  # messages moved from a socket to the buffers per read
_PACK, _PACK_BYTES = 128, 128 * 1024  # at most per batch frame (batch_publisher)
_zmq_poll = zmq.zmq_poll
_send = super(zmq.Socket, zmq.Socket).send  # the compiled send (as fast_publisher's): no Python frame
_DEAD_KEEP = 10_000

CAPABILITIES = Capabilities(
    name="zeromq",
    topic=NATIVE,
    patterns=EMULATED,
    ttl=EMULATED,
    retry=NATIVE,
    dead_letter=NATIVE,
    # no broker holds subscription state, so there is nothing to share: named subscriptions
    # are refused altogether (a PUB/SUB subscriber lives and dies with its socket)
    shared_subscription=UNSUPPORTED,
    confirmed_send=False,
    persistent=False,
    guarantee="at-most-once",
    brokerless=True,
    request_reply=NATIVE,  # the requester binds a PULL of its own; replies are PUSHed to it
    nowait=("poll", "ack"),  # a poll reads the socket with NOBLOCK and never waits for its lock; an ack is bookkeeping
    notes="no broker: messages live in socket buffers and the receiving process; a killed consumer loses what "
    "it had buffered; PUB drops while subscribers join; retry and dead letters stay in the consumer's process",
)
ACK_CAPABILITIES = Capabilities(
    name="zeromq-ack",
    topic=UNSUPPORTED,
    ttl=EMULATED,
    retry=NATIVE,
    dead_letter=NATIVE,
    confirmed_send=False,
    persistent=False,
    guarantee="at-least-once",
    brokerless=True,
    request_reply=NATIVE,
    notes="?ack=1: the producer process is the store (ROUTER/DEALER, credit = prefetch); unacked messages go to "
    "another consumer when one is silent for `lease` s; lost if the producer process dies",
)
CAPABILITY_ROWS = [CAPABILITIES, ACK_CAPABILITIES]


class _Hub:
    """One socket of this process for one (kind, address), shared by every backend using it."""

    def __init__(self, key: tuple[int, str, bool, link.Settings], sock: zmq.Socket[bytes]) -> None:
        self.key = key
        self.sock = sock
        self.lock = threading.Lock()
        self.refs = 0
        self.queues: dict[bytes, deque[bytes]] = {}  # PULL: messages read, by queue
        self.subs: list[_TopicSub] = []  # SUB: local subscriptions
        self.joined = False  # PUB: a subscriber was seen (or join timed out)
        self.private = False  # this backend's own socket, never shared
        self.pollset = [(sock, zmq.POLLIN)]
        self.piling: set[bytes] = set()  # PULL: queues warned about (read)
        self.limit: int = sock.rcvhwm  # read once: a getsockopt per read is a Python call chain

    def read(self, wait: float) -> None:
        """Move what the socket has into the buffers, waiting up to ``wait`` s. With the lock held."""
        sock = self.sock
        # zmq_poll, not Socket.poll (a Poller object per call) and not a recv that ends in
        # zmq.Again (pyzmq builds each error with imports, ~6 µs): a request/reply service
        # reads one message per wait, and an empty poll is every idle consumer's
        pollset = self.pollset
        if not _zmq_poll(pollset, (int(wait * 1000) or 1) if wait > 0 else 0):
            return
        # read once per batch, not per message: with the lock held nothing changes them
        recv, subs, queues, noblock, limit = sock.recv, self.subs, self.queues, zmq.NOBLOCK, self.limit
        if len(queues) > 1:
            self._piling(limit)
        # at most hwm frames per read: read() runs when the caller's buffer is empty, so a
        # buffer stays within hwm and the rest waits in the socket, where the HWM holds the
        # producer back (the buffers have no maxlen: a full one dropped its oldest silently)
        for i in range(_BATCH if limit > _BATCH else limit):
            if i == 1 and not _zmq_poll(pollset, 0):
                return  # one message came: no zmq.Again to end the batch (a burst pays one)
            try:
                raw = recv(noblock)
            except zmq.Again:
                return
            name, _, payload = raw.partition(b"\0")
            if subs:
                for sub in subs:
                    if sub.wants(name):
                        sub.buf.append(payload)
                continue
            q = queues.get(name)
            if q is None:
                if name[:1] == b"\x01":  # a batch frame (batch_publisher): no queue name starts so
                    q = queues.get(name[1:])
                    if q is None:
                        q = queues[name[1:]] = deque()
                    q.extend(payload.split(b"\0"))
                    if len(q) >= limit:
                        return
                    continue
                q = queues[name] = deque()  # a queue no local consumer took yet
            q.append(payload)

    def _piling(self, limit: int) -> None:
        """A queue whose consumer does not read, on a socket another queue's consumer reads,
        grows in this process (one socket has one HWM): said once per queue."""
        for name, q in self.queues.items():
            if len(q) >= 2 * limit + _PACK and name not in self.piling:
                self.piling.add(name)
                log.warning("zeromq: %d messages of queue %r wait in this process and its consumer is not "
                            "receiving them (another queue's consumer reads the shared socket)",
                            len(q), name.decode(errors="replace")[:100])

    def wait_for_subscriber(self, join: float) -> None:
        """PUB's slow joiner: a fresh socket waits (once) up to ``join`` s for a first subscription."""
        deadline = time.monotonic() + join
        while not self.joined:
            left = deadline - time.monotonic()
            if left <= 0 or self.sock.poll(int(left * 1000) or 1):
                self.joined = True
        while self.sock.poll(0):
            self.sock.recv()  # subscription notices: read so they never pile up


_hubs: dict[tuple[int, str, bool, link.Settings], _Hub] = {}  # sockets differ by settings (keys)
_hubs_lock = threading.Lock()


def _acquire(s: link.Settings, kind: int, addr: str, bind: bool) -> _Hub:
    key = (kind, addr, bind, s)
    if kind == zmq.PUSH and not bind:
        # a connecting PUSH is this backend's own (several connects are fine): no lock per send,
        # the portable layer already serialises calls into one backend
        own = _Hub(key, link.socket(s, kind, addr, False))
        own.refs = 1
        own.private = True
        return own
    with _hubs_lock:
        hub = _hubs.get(key)
        if hub is None:
            sock = link.socket(s, kind, addr, bind)
            hub = _hubs[key] = _Hub(key, sock)
            if kind == zmq.XPUB:
                hub.sock.xpub_verbose = True
        hub.refs += 1
        return hub


def _release(hub: _Hub) -> None:
    if hub.private:
        hub.sock.close()
        return
    with _hubs_lock:
        hub.refs -= 1
        if hub.refs == 0:
            _hubs.pop(hub.key, None)
            with hub.lock:
                if hub.key[2]:
                    link.close_bound(hub.sock, hub.key[1])
                else:
                    hub.sock.close()



def _not_open(data: bytes) -> object:  # pragma: no cover - heads is empty until the socket is open
    raise RuntimeError("zmq PUSH socket not open")


_dead: dict[tuple[str, str], deque[bytes]] = {}  # (address, queue) -> dead letters kept in this process


class ZmqBackend(Backend):
    capabilities = CAPABILITIES
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    url_params = link.OPTIONS
    lease_param = "lease"  # acknowledged mode: seconds a silent consumer keeps its messages

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        self.s = link.parse(url)
        if self.s.ack:
            self.capabilities = ACK_CAPABILITIES
        self.hubs: dict[tuple[int, bool], _Hub] = {}
        self.store: link.AckStore | None = None
        self.closed = False
        self.heads: dict[str, bytes] = {}  # queue name -> frame head, once the PUSH socket is open
        self.theads: dict[str, bytes] = {}  # topic name -> frame head
        self.replies: dict[str, zmq.Socket[bytes]] = {}  # reply address -> PUSH (oldest closed first)
        self.pub: _Hub | None = None
        self.push_lock: threading.Lock | None = None
        self.push_send: Callable[[bytes], object] = _not_open

    def open(self) -> None:
        link.warn_if_exposed(self.url, self.s)
        link.context()

    def _hub(self, kind: int, bind: bool) -> _Hub:
        hub = self.hubs.get((kind, bind))
        if hub is None:
            addr = self.s.topic_addr if kind in (zmq.XPUB, zmq.SUB) else self.s.queue_addr
            hub = self.hubs[(kind, bind)] = _acquire(self.s, kind, addr, bind)
        return hub

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.heads.clear()
        self.pub = None
        for sock in self.replies.values():
            sock.close()
        self.replies.clear()
        for hub in self.hubs.values():
            _release(hub)
        self.hubs.clear()
        if self.store is not None:
            _release_store(self.store, self.s.linger_ms / 1000)

    def publish(
        self, destination: Destination, payload: bytes, *, message_id: str,
        priority: int | None = None, delay: float | None = None, ttl: float | None = None,
    ) -> None:
        # the hot path: a known queue on the open PUSH socket (one dict lookup, one concat)
        head = self.heads.get(destination.name) if destination.__class__ is Queue else None
        if head is not None:
            lock = self.push_lock
            try:
                if lock is None:
                    self.push_send(head + payload)
                else:
                    with lock:
                        self.push_send(head + payload)
            except zmq.Again:
                raise zmq.ZMQError(errno.EAGAIN, self._full()) from None
            return
        if destination.__class__ is Queue:
            if self.s.ack:
                store = self.store or self._store()
                store.put(destination.name.encode(), payload)
                return
            hub = self._hub(zmq.PUSH, self.s.producer_binds)
            # pyzmq's compiled send, past its Python wrapper (~0.5 us a message here)
            self.push_lock, self.push_send = (None if hub.private else hub.lock), _send.__get__(hub.sock)
            head = destination.name.encode() + b"\0"
            if len(self.heads) < 10_000:
                self.heads[destination.name] = head
            try:
                with hub.lock:
                    hub.sock.send(head + payload)
            except zmq.Again:
                raise zmq.ZMQError(errno.EAGAIN, self._full()) from None
            return
        hub = self.pub or self._pub()
        head = self.theads.get(destination.name)
        if head is None:
            head = destination.name.encode() + b"\0"
            if len(self.theads) < 10_000:
                self.theads[destination.name] = head
        with hub.lock:
            if not hub.joined:
                hub.wait_for_subscriber(self.s.join)
            hub.sock.send(head + payload)

    def fast_publisher(self, destination: Destination) -> tuple[bytes, Callable[[bytes], object]] | None:
        # the queue's PUSH socket once open. The send is pyzmq's compiled one, past its Python
        # wrapper, which only adds routing_id/group (for socket types other than PUSH).
        head = self.heads.get(destination.name) if destination.__class__ is Queue else None
        if head is None:
            return None
        send = super(zmq.Socket, self.hubs[(zmq.PUSH, self.s.producer_binds)].sock).send
        lock = self.push_lock  # a bound PUSH is shared by this process's backends; our own is not
        if lock is None:
            # the compiled send itself: no Python frame per message (fast_error rewords its zmq.Again)
            return head, send

        def fast(frame: bytes) -> object:
            with lock:
                return send(frame)

        return head, fast

    def batch_publisher(self, destination: Destination) -> Callable[[list[bytes]], object] | None:
        # batch frames (Hub.read splits them): "\x01 name NUL env NUL env ...", up to _PACK
        # envelopes or _PACK_BYTES each, so one send and one receive carry many messages, and
        # PUSH still spreads a long batch over its workers
        head = self.heads.get(destination.name) if destination.__class__ is Queue else None
        if head is None:
            return None
        bhead = b"\x01" + head
        sock = self.hubs[(zmq.PUSH, self.s.producer_binds)].sock
        send = super(zmq.Socket, sock).send
        lock = self.push_lock

        def send_batch(payloads: list[bytes]) -> None:
            i, n = 0, len(payloads)
            while i < n:
                j, size = i, 0
                while j < n and j - i < _PACK and size < _PACK_BYTES:
                    size += len(payloads[j])
                    j += 1
                part = payloads[i:j]
                frame = bhead + b"\0".join(part)
                if frame.count(b"\0") != len(part):  # a NUL in a payload: one frame each
                    frame = b""
                try:
                    if lock is not None:
                        lock.acquire()
                    try:
                        if frame:
                            send(frame)
                        else:
                            for p in part:
                                send(head + p)
                    finally:
                        if lock is not None:
                            lock.release()
                except zmq.Again:
                    raise zmq.ZMQError(errno.EAGAIN, f"{self._full()} ({i} of this batch's {n} were sent)") from None
                i = j

        return send_batch

    def fast_error(self, exc: Exception) -> Exception:
        if isinstance(exc, zmq.Again):  # a send that timed out says what to do about it
            return zmq.ZMQError(errno.EAGAIN, self._full())
        return exc

    def nowait_publisher(self, destination: Destination) -> Callable[[bytes], bool] | None:
        # fast_publisher's send with NOBLOCK: at the high-water mark it says so instead of
        # waiting up to send_timeout (the asyncio twin then sends from a thread)
        if destination.__class__ is not Queue or destination.name not in self.heads:
            return None
        sock = self.hubs[(zmq.PUSH, self.s.producer_binds)].sock
        send = super(zmq.Socket, sock).send
        lock = self.push_lock

        def nowait(frame: bytes) -> bool:
            if lock is not None and not lock.acquire(False):
                return False
            try:
                send(frame, zmq.NOBLOCK)
                return True
            except zmq.Again:
                return False
            finally:
                if lock is not None:
                    lock.release()

        return nowait

    def publish_many(self, items: Sequence[Outgoing]) -> None:
        # send_many's batch: plain messages to known queues on the own PUSH socket go out
        # without a keyword call into publish each (the option-less hot path of publish)
        heads, send = self.heads, self.push_send
        for it in items:
            head = heads.get(it.destination.name) if it.destination.__class__ is Queue else None
            if head is None or self.push_lock is not None:
                self.publish(it.destination, it.payload, message_id=it.message_id, priority=it.priority,
                             delay=it.delay, ttl=it.ttl)
                heads, send = self.heads, self.push_send  # publish may have opened the socket
                continue
            try:
                send(head + it.payload)
            except zmq.Again:
                raise zmq.ZMQError(errno.EAGAIN, self._full()) from None

    def _full(self) -> str:
        who = "no consumer is connected yet (bind=producer) or " if self.s.producer_binds else ""
        return (f"no peer took the message within send_timeout={self.s.send_timeout_ms / 1000:g}s: {who}the "
                f"consumers are not reading and the pipe is at its high-water mark (hwm={self.s.hwm}); "
                "raise send_timeout or hwm in the URL, or start a consumer")

    def _pub(self) -> _Hub:
        self.pub = self._hub(zmq.XPUB, self.s.bind != "none")
        return self.pub

    def _store(self) -> link.AckStore:
        self.store = _acquire_store(self.s)
        if self.store.error is not None:
            raise self.store.error
        return self.store

    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        if subscription is not None:
            raise UnsupportedError("the zeromq backend has no durable (named) topic subscriptions: nothing keeps "
                                   "messages while no subscriber is connected; omit subscription=")
        if self.s.ack:
            if isinstance(destination, Topic):
                raise UnsupportedError("zeromq acknowledged mode (ack=1) has no topics; use a URL without ack=1")
            return _AckSub(self.s, destination, prefetch)
        if isinstance(destination, Topic):
            return _TopicSub(self._hub(zmq.SUB, False), destination)
        return _QueueSub(self._hub(zmq.PULL, self.s.consumer_binds), destination, self.s.queue_addr)

    def reply_path(self, name: str) -> ReplyPath:
        self._no_curve()
        return _ReplyPath(self.s, name)

    def send_reply(self, address: str, payload: bytes, *, message_id: str, ttl: float | None,
                   correlation_id: str | None = None) -> None:
        # ZeroMQ frames have no correlation field of their own: the envelope carries it
        self._no_curve()
        sock = self.replies.get(address)
        if sock is None:
            # a reply address comes from a message: only the transport and host of this URL
            # are accepted, so a forged mqreplyto cannot make a worker connect elsewhere
            if not address.startswith(self.s.reply_base):
                raise ValueError(f"reply address {address[:100]!r} is not on this URL's transport and host "
                                 f"({self.s.reply_base}...): not sent")
            sock = self.replies[address] = link.socket(self.s, zmq.PUSH, address, False)
            if len(self.replies) > 64:
                self.replies.pop(next(iter(self.replies))).close()
        _send(sock, payload)

    def _no_curve(self) -> None:
        if self.s.curve_secret or self.s.curve_server:
            raise UnsupportedError("zeromq request/reply over CURVE is not supported (each reply path would need "
                                   "keys of its own); use a URL without curve_* options on loopback")

    def dead_letter_store(self, queue: str) -> DeadLetterStore | None:
        if self.s.ack:
            return None  # the producer's store keeps them under <queue>.dead: the portable store reads it
        return _LocalDead(self, queue)


_stores: dict[str, tuple[link.AckStore, int]] = {}
_stores_lock = threading.Lock()


def _acquire_store(s: link.Settings) -> link.AckStore:
    with _stores_lock:
        store, refs = _stores.get(s.queue_addr) or (link.AckStore(s), 0)
        _stores[s.queue_addr] = (store, refs + 1)
        return store


def _release_store(store: link.AckStore, wait: float) -> None:
    with _stores_lock:
        _, refs = _stores[store.s.queue_addr]
        if refs > 1:
            _stores[store.s.queue_addr] = (store, refs - 1)
            return
        del _stores[store.s.queue_addr]
    store.close(wait)


class _Delivery(Delivery):
    """A plain-mode delivery, made with object's own init and one store: the dataclass
    ``__init__`` (a Python call through ``type.__call__``, six stores) cost a fifth of this
    driver's receive. The fields it never varies are class attributes (read-only on an
    instance; nothing writes them), except ``extra_attempts``, which the consumer reads on
    every receive: a class attribute over the slot cannot be read by a specialised
    instruction (Python 3.11), and that generic read cost more than storing the slot.
    Hashed by identity: it is its own tag."""

    __slots__ = ()
    tag = None
    broker_redelivered = False
    reply_to = None
    correlation_id = None
    __hash__ = object.__hash__  # type: ignore[assignment]
    __eq__ = object.__eq__  # type: ignore[assignment]
    # _Delivery() is then object's own new and init, ~0.3k instructions cheaper than
    # object.__new__(_Delivery) (a builtin called through an argument tuple, MRO walk)
    __init__ = object.__init__  # type: ignore[assignment]


class _QueueSub(Subscription):
    def __init__(self, hub: _Hub, destination: Destination, addr: str) -> None:
        self.hub = hub
        self.destination = destination
        self.retry_target = Queue(destination.name)
        self.dead_target = Queue(f"{destination.name}.dead")
        self.addr = addr
        with hub.lock:
            self.buf = hub.queues.setdefault(destination.name.encode(), deque())  # bounded by Hub.read
        self.unsettled: dict[Delivery, None] = {}  # in delivery order
        # ack is bookkeeping only: the dict's own C method, no Python frame per message; atomic
        # (KeyError once the delivery is gone), so Message.ack skips the consumer's lock
        self.ack = self.lockfree_ack = self.unsettled.pop  # type: ignore[method-assign,assignment]
        self.lockfree_receive = True  # receive(0.0) is buffer pops and dict stores (see its closed check)
        self.closed = False

    def receive(self, timeout: float | None) -> Delivery | None:
        buf = self.buf
        if not buf:
            hub = self.hub
            deadline = None if timeout is None else time.monotonic() + timeout
            while not buf:
                # a poll never waits for another reader's slice (Capabilities.nowait "poll")
                if not hub.lock.acquire(timeout != 0):
                    return None
                try:
                    if buf:
                        break
                    left = _SLICE if deadline is None else min(deadline - time.monotonic(), _SLICE)
                    hub.read(left)
                finally:
                    hub.lock.release()
                if not buf and deadline is not None and time.monotonic() >= deadline:
                    return None
        try:
            payload = buf.popleft()
        except IndexError:  # another local consumer took it meanwhile
            return None
        d: Delivery = _Delivery()
        d.payload = payload
        d.extra_attempts = 0
        self.unsettled[d] = None
        if self.closed:
            # a close began meanwhile (lockfree_receive: the consumer polls without its lock):
            # the delivery goes back, by close or by this, never by both and never lost
            if self.unsettled.pop(d, 0) is None:
                buf.appendleft(payload)
            return None
        return d

    def ack(self, delivery: Delivery) -> None:
        del self.unsettled[delivery]

    def requeue(self, delivery: Delivery) -> None:
        del self.unsettled[delivery]
        self.buf.appendleft(delivery.payload)

    def retry(self, delivery: Delivery, payload: bytes, delay: float) -> None:
        del self.unsettled[delivery]
        self.buf.append(payload)

    def dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        self.unsettled.pop(delivery, None)
        _dead.setdefault((self.addr, self.destination.name), deque(maxlen=_DEAD_KEEP)).append(payload)

    def close(self) -> None:
        # back to this process's buffer, in their order (the newest first to the front); one
        # popitem at a time, because an ack (lockfree_ack) may pop one meanwhile: each
        # delivery is then either acked or given back, never both
        self.closed = True  # first: a receive polling meanwhile sees it (receive)
        unsettled, buf = self.unsettled, self.buf
        while unsettled:
            try:
                d, _ = unsettled.popitem()
            except KeyError:  # acked meanwhile
                break
            buf.appendleft(d.payload)


class _TopicSub(Subscription):
    def __init__(self, hub: _Hub, destination: Topic) -> None:
        self.hub = hub
        self.destination = destination
        words = destination.name.split(".")
        literal = list(itertools.takewhile(lambda w: w not in ("*", "#"), words))
        self.exact = destination.name.encode() if len(literal) == len(words) else None
        self.prefix = (destination.name + "\0").encode() if self.exact else ".".join(literal).encode()
        safe = destination.name.replace("*", "_star").replace("#", "_hash")
        self.retry_target = Queue(safe)
        self.dead_target = Queue(f"{safe}.dead")
        self.buf: deque[bytes] = deque(maxlen=hub.sock.rcvhwm)
        self.unsettled: dict[Delivery, None] = {}
        self.ack = self.lockfree_ack = self.unsettled.pop  # type: ignore[method-assign,assignment,misc]  # as _QueueSub's
        self.lockfree_receive = True
        self.closed = False
        with hub.lock:
            hub.sock.setsockopt(zmq.SUBSCRIBE, self.prefix)
            hub.subs.append(self)

    def wants(self, name: bytes) -> bool:
        if self.exact is not None:
            return name == self.exact
        return name.startswith(self.prefix) and matches(self.destination.name, name.decode("utf-8", "replace"))

    receive = _QueueSub.receive
    ack = _QueueSub.ack
    requeue = _QueueSub.requeue
    retry = _QueueSub.retry

    def dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        self.unsettled.pop(delivery, None)
        log.warning("zeromq: dead letter of a topic subscription dropped (reason: %s)", reason[:200])

    def close(self) -> None:
        self.closed = True
        with self.hub.lock:
            if self in self.hub.subs:
                self.hub.subs.remove(self)
                self.hub.sock.setsockopt(zmq.UNSUBSCRIBE, self.prefix)
        self.unsettled.clear()  # a private subscription ends with its consumer


class _AckSub(Subscription):
    def __init__(self, s: link.Settings, destination: Destination, prefetch: int) -> None:
        self.destination = destination
        self.retry_target = Queue(destination.name)
        self.dead_target = Queue(f"{destination.name}.dead")
        self.delivery_lease = s.lease
        self.rx = link.AckReceiver(s, destination.name, prefetch)
        self.unsettled: set[bytes] = set()

    def receive(self, timeout: float | None) -> Delivery | None:
        if self.rx.lapsed():
            self.unsettled.clear()  # the producer gave them to others
            self.rx.rejoin()
        got = self.rx.receive(timeout)
        if got is None:
            return None
        tag, n, payload = got
        self.unsettled.add(tag)
        return Delivery(payload, tag, extra_attempts=n - 1, broker_redelivered=n > 1)

    def _held(self, delivery: Delivery) -> None:
        if delivery.tag not in self.unsettled or self.rx.lapsed():
            self.unsettled.discard(delivery.tag)
            raise zmq.ZMQError(errno.ETIMEDOUT, f"the lease ({self.delivery_lease:g} s) ran out before this "
                               "message was settled or touched: the producer gave it to another consumer")

    def ack(self, delivery: Delivery) -> None:
        self._held(delivery)
        self.unsettled.discard(delivery.tag)
        self.rx.send(b"A", delivery.tag)

    def requeue(self, delivery: Delivery) -> None:
        self._held(delivery)
        self.unsettled.discard(delivery.tag)
        self.rx.send(b"Y", delivery.tag, delivery.payload)

    def retry(self, delivery: Delivery, payload: bytes, delay: float) -> None:
        self._held(delivery)
        self.unsettled.discard(delivery.tag)
        self.rx.send(b"Y", delivery.tag, payload)

    def dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        self._held(delivery)
        self.unsettled.discard(delivery.tag)
        self.rx.send(b"D", delivery.tag, payload)

    def touch(self, delivery: Delivery) -> None:
        self._held(delivery)
        self.rx.beat()

    def close(self) -> None:
        self.rx.close(sorted(self.unsettled))
        self.unsettled.clear()


class _ReplyPath(ReplyPath):
    """A PULL this connection binds for its replies: tcp on the URL's host and a port the
    system picks, ipc on ``PATH.<name>`` (removed on close)."""

    def __init__(self, s: link.Settings, name: str) -> None:
        bind = f"{s.reply_base}*" if s.reply_base.startswith("tcp") else f"{s.reply_base}{name}"
        self.sock = link.socket(s, zmq.PULL, bind, True)
        self.pollset = [(self.sock, zmq.POLLIN)]
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.fd: int = self.sock.FD

    def receive(self, timeout: float) -> bytes | None:
        if not _zmq_poll(self.pollset, int(timeout * 1000)):  # as _Hub.read
            return None
        return self.sock.recv(zmq.NOBLOCK)

    def loop_fd(self) -> int | None:
        # libzmq's FD: readable when the socket's events may have changed; receive(0)'s
        # zmq_poll reads them, which re-arms it, so draining until None misses no reply
        return self.fd

    def close(self) -> None:
        link.close_bound(self.sock, self.address)
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[6:])
            except OSError:
                pass


class _LocalDead(DeadLetterStore):
    """Dead letters a plain-mode consumer of this process kept for ``queue``."""

    def __init__(self, backend: ZmqBackend, queue: str) -> None:
        self.backend = backend
        self.queue = queue
        self.q = _dead.setdefault((backend.s.queue_addr, queue), deque(maxlen=_DEAD_KEEP))

    def list(self, limit: int) -> list[bytes]:
        return list(itertools.islice(self.q, limit))

    def replay(self, limit: int | None, ids: set[str] | None = None) -> int:
        n = 0
        for payload in list(self.q):
            if limit is not None and n >= limit:
                break
            body, mid = _fresh(payload)
            if ids is not None and mid not in ids:
                continue
            self.backend.publish(Queue(self.queue), body, message_id=mid or "replayed")
            self.q.remove(payload)
            n += 1
        return n

    def purge(self) -> int:
        n = len(self.q)
        self.q.clear()
        return n


def _fresh(body: bytes) -> tuple[bytes, str | None]:
    """The payload to replay (attempt 1, no reason or origin) and its message id."""
    try:
        env = decode(body, max(len(body), 1))
    except EnvelopeError:
        return body, None
    return encode(replace(env, attempt=1, reason=None, origin=None), 1 << 62, original=body), env.id
