"""The driver SPI: what a backend implements, and the rules it follows.

A backend translates mqprimer's few operations into one client library's calls and
nothing else. The portable layer (:mod:`mqprimer.client`) does everything that is the
same everywhere: envelopes, attempt counting, retry policy, emulated retry and dead
letters, TTL checks, size limits, capability checks, error mapping, reconnect and
failover.

Rules for drivers (the conformance suite in :mod:`mqprimer.testing` checks them):

1. ``capabilities`` says what the backend does. The portable layer only passes options
   the record declares; a driver never receives ``priority`` unless ``priority`` is
   native, ``delay`` unless ``delay`` is native, and so on.
2. Drivers raise their client library's own exceptions. They list the ones that mean
   "the connection is gone" in ``connection_errors`` and the ones that mean "credentials
   or access refused" in ``auth_errors``; the portable layer maps them to
   :class:`~mqprimer.errors.ConnectionFailed` / :class:`~mqprimer.errors.AuthenticationError`,
   reconnects and fails over. Drivers do not retry, reconnect, sleep, or wrap errors.
3. Drivers never log payloads or passwords (``str(url)`` hides the password).
4. ``publish`` returns only when the broker has the message if
   ``capabilities.confirmed_send`` is true.
5. Payloads are opaque ``bytes``. A driver never decodes them, except to read what the
   broker itself cannot carry (never needed so far).
6. ``Subscription.close()`` gives every unsettled delivery back to the broker.
7. ``retry`` and ``dead_letter`` on a subscription are called only when the matching
   capability is :attr:`Support.NATIVE`; when it is :attr:`Support.EMULATED` the portable
   layer publishes the new payload (to ``retry_target`` or ``dead_target``) and then acks.
   When it is :attr:`Support.UNSUPPORTED` the portable layer raises ``UnsupportedError``
   and leaves the message unsettled: a refused outcome never drops a message.
8. A backend is used from one thread at a time; the portable layer serialises access.
9. A backend whose deliveries carry a lease (``Subscription.delivery_lease``) set by a URL
   option names that option in ``lease_param``, so the conformance suite can shorten it.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .errors import UnsupportedError
from .url import URL


class Support(str, enum.Enum):
    """How a backend provides a feature."""

    NATIVE = "native"  # the broker does it
    EMULATED = "emulated"  # mqprimer does it on top of the broker (documented per backend)
    UNSUPPORTED = "unsupported"  # refused with UnsupportedError

    def __bool__(self) -> bool:
        return self is not Support.UNSUPPORTED


NATIVE, EMULATED, UNSUPPORTED = Support.NATIVE, Support.EMULATED, Support.UNSUPPORTED


class Status(str, enum.Enum):
    """Where a message is, for :meth:`mqprimer.Connection.status`."""

    READY = "ready"  # waiting for a consumer
    DELAYED = "delayed"  # waiting for its delay to pass
    RESERVED = "reserved"  # delivered, not settled yet
    DONE = "done"  # acked
    DEAD = "dead"  # in the dead-letter destination
    UNKNOWN = "unknown"  # never seen, or gone (some brokers forget acked messages)


@dataclass(frozen=True)
class Topic:
    """A publish-subscribe destination: every subscription gets every message.

    Names are dot-separated words (``logs.error``). Consumers may use AMQP-style
    patterns: ``*`` matches one word, ``#`` zero or more words.
    """

    name: str

    def __str__(self) -> str:
        return f"topic:{self.name}"


@dataclass(frozen=True)
class Queue:
    """A point-to-point destination (a plain ``str`` means the same)."""

    name: str

    def __str__(self) -> str:
        return self.name


Destination = Queue | Topic


@dataclass(frozen=True)
class Capabilities:
    """What one backend (or broker flavour) can do. The docs' matrix is generated from these."""

    name: str
    queue: Support = NATIVE
    topic: Support = UNSUPPORTED
    patterns: Support = UNSUPPORTED  # wildcard topic subscriptions
    priority: Support = UNSUPPORTED  # 0 (lowest, default) .. 9 (most urgent)
    # how many priorities the broker tells apart: 0..9 fall into this many equal bands,
    # band = priority * priority_levels // 10; order holds between bands, FIFO within one
    priority_levels: int = 10
    delay: Support = UNSUPPORTED
    ttl: Support = EMULATED  # at least the portable expiry check on receive
    retry: Support = EMULATED
    dead_letter: Support = EMULATED
    status: Support = UNSUPPORTED
    # conn.request() / message.reply(): NATIVE where the protocol has a reply path
    # (Backend.reply_path overridden), EMULATED with the portable private reply queue
    request_reply: Support = UNSUPPORTED
    # conn.stats(queue): NATIVE where the broker reports counts (those it cannot tell are None,
    # never guessed: see QueueStats and the backend's docs); UNSUPPORTED when it tells nothing
    stats: Support = UNSUPPORTED
    # several consumers on one named topic subscription (conn.consumer(Topic(...),
    # subscription="billing")) share its messages, each delivered to one of them (a consumer
    # group); UNSUPPORTED: a second consumer of a name already consumed is refused
    shared_subscription: Support = UNSUPPORTED
    confirmed_send: bool = True
    persistent: bool = False
    guarantee: str = "at-least-once"  # or "at-most-once"
    # no broker process (ZeroMQ): connecting cannot fail because a peer is absent; peers
    # find each other when both are up, so "broker down at connect" does not apply
    brokerless: bool = False
    max_message_size: int | None = None
    size_limit_hint: str = ""  # how to raise the broker's own limit
    notes: str = ""
    # Subscription operations that never wait (no network round trip, no broker, no lock that
    # another thread holds across I/O), so the asyncio twin may run them on its event loop
    # instead of handing them to a thread (a hop costs ~20-60 us here): "poll" is
    # ``receive(0.0)``, which then only takes what this process already holds; "ack" is
    # ``ack``. Either one, when it raises, has done nothing (the twin repeats it on a thread,
    # where the portable layer handles the error). Empty (the default): always on a thread.
    nowait: tuple[str, ...] = ()

    def require(self, feature: str, what: str | None = None) -> None:
        """Raise :class:`UnsupportedError` unless ``feature`` is native or emulated."""
        if not getattr(self, feature):
            raise UnsupportedError(
                f"the {self.name} backend does not support {what or feature}; "
                "see `mqprimer backends` for what each backend supports"
            )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Support) else value
        return out


FEATURES = (
    "queue", "topic", "patterns", "priority", "delay", "ttl", "retry", "dead_letter", "status", "request_reply",
    "stats", "shared_subscription",
)


@dataclass(frozen=True)
class QueueStats:
    """What a broker can tell about one queue (:meth:`mqprimer.Connection.stats`).

    Each count is ``None`` where the broker cannot tell it (never a guess): ``ready`` waiting
    for a consumer, ``delayed`` waiting for their delay, ``reserved`` delivered and not
    settled, ``dead`` in the queue's dead letters, ``consumers`` attached now.
    ``enqueued`` and ``dequeued`` are running totals of messages put in and taken out for
    good, where the broker keeps them (they may restart from 0): ``mqprimer stats --watch``
    turns them into rates.
    """

    destination: str
    ready: int | None = None
    delayed: int | None = None
    reserved: int | None = None
    dead: int | None = None
    consumers: int | None = None
    enqueued: int | None = None
    dequeued: int | None = None

    COUNTS: ClassVar[tuple[str, ...]] = ("ready", "delayed", "reserved", "dead", "consumers", "enqueued", "dequeued")

    def as_dict(self) -> dict[str, Any]:
        return {"destination": self.destination, **{k: getattr(self, k) for k in self.COUNTS}}


@dataclass(slots=True)
class Delivery:
    """One message as a driver received it."""

    payload: bytes
    tag: Any = None  # whatever the driver needs to settle it
    extra_attempts: int = 0  # deliveries the broker counted that the envelope does not show
    broker_redelivered: bool = False
    # the protocol's own reply address and correlation id (AMQP properties, STOMP headers),
    # as the broker delivered them: they win over the envelope's (a raw client sets only these)
    reply_to: str | None = None
    correlation_id: str | None = None


@dataclass(slots=True)
class Outgoing:
    """One message for :meth:`Backend.publish_many`."""

    destination: Destination
    payload: bytes
    message_id: str
    priority: int | None = None
    delay: float | None = None
    ttl: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Subscription(ABC):
    """A live subscription to one destination. Created by :meth:`Backend.subscribe`."""

    destination: Destination
    #: where an emulated retry is republished (the subscription's own queue)
    retry_target: Destination
    #: the queue that holds this subscription's dead letters
    dead_target: Queue
    #: seconds an unsettled delivery stays this consumer's before the broker may give it to
    #: another (beanstalkd's TTR, sqlite's visibility timeout); ``None``: until it is
    #: settled or the connection closes. :meth:`touch` starts a new one.
    delivery_lease: float | None = None
    #: Where :meth:`ack` is one atomic step (under the GIL) of bookkeeping in this process,
    #: safe beside any other call and raising ``KeyError`` for a delivery it no longer holds
    #: (zeromq plain mode): that callable, which :meth:`Message.ack` calls without the
    #: consumer's lock; ``None``: acks take the lock
    lockfree_ack: Callable[[Delivery], object] | None = None
    #: ``True``: :meth:`receive` with timeout 0 is safe beside any other call without the
    #: consumer's lock, and takes nothing once :meth:`close` has begun (returns ``None``; the
    #: message stays for the next reader): the consumer's fast path then polls without it
    lockfree_receive: bool = False

    @abstractmethod
    def receive(self, timeout: float | None) -> Delivery | None:
        """Return the next delivery, or ``None`` after ``timeout`` seconds (0 = poll)."""

    @abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """Remove the message for good."""

    @abstractmethod
    def requeue(self, delivery: Delivery) -> None:
        """Give the message back to the broker as it is, for redelivery now."""

    def retry(self, delivery: Delivery, payload: bytes, delay: float) -> None:
        """Native retry: redeliver ``payload`` (attempt + 1) after ``delay`` seconds."""
        raise UnsupportedError("native retry is not implemented by this backend")

    def dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        """Native dead letter: move the message (as ``payload``) to the dead letters."""
        raise UnsupportedError("native dead letters are not implemented by this backend")

    def touch(self, delivery: Delivery) -> None:
        """Keep an unsettled delivery for another :attr:`delivery_lease`.

        Backends whose deliveries stay reserved until settled (``delivery_lease`` is
        ``None``) have nothing to renew: the default does nothing. Raise if the lease has
        already run out and the message may have gone to another consumer.
        """
        return None

    def receive_nowait(self) -> Delivery | None:
        """The asyncio twin's poll on its event loop (``"poll"`` in ``Capabilities.nowait``):
        ``receive(0.0)`` that never waits; ``None`` where it would (nothing done then). The
        default is ``receive(0.0)``, for drivers whose ``receive(0.0)`` never waits anyway."""
        return self.receive(0.0)

    def ack_nowait(self, delivery: Delivery) -> bool:
        """The twin's ack on its event loop (``"ack"`` in ``Capabilities.nowait``): ``False``
        (nothing done; the twin calls :meth:`ack` on a thread) where it would wait. The
        default is :meth:`ack`, for drivers whose ``ack`` never waits anyway."""
        self.ack(delivery)
        return True

    @abstractmethod
    def close(self) -> None:
        """Stop receiving; every unsettled delivery goes back to the broker."""

    # The optional asyncio SPI: the same operations on the running event loop's own
    # non-blocking I/O, for drivers whose round trip is short enough that a thread hop
    # (~50 us) would cost the asyncio twin half its speed (beanstalk). Called on the loop,
    # with the portable layer's subscription lock held; they never wait for a lock (busy:
    # NotNow) and never block the loop. NotNow: nothing was done, the twin takes the blocking
    # path on a thread; any other error: the twin repeats the call on that path, which meets
    # the same error (a driver makes a connection it cannot trust unusable first) and
    # handles it as usual. A cancelled call leaves the connection in step with its replies
    # and nothing half-taken (drained, given back, or the connection dropped). The defaults
    # mean "not offered" (the twin checks for an override once per class).
    async def receive_async(self, timeout: float) -> Delivery | None:
        """:meth:`receive` with ``timeout`` seconds, awaited on the event loop."""
        raise NotNow("not offered")

    async def ack_async(self, delivery: Delivery) -> None:
        """:meth:`ack`, awaited on the event loop; cancelled mid-way, the ack still completes
        (or the connection is dropped and the broker redelivers)."""
        raise NotNow("not offered")


class NotNow(Exception):
    """An asyncio SPI call did nothing (not offered, or the connection is busy): take the
    blocking path on a thread."""


class DeadLetterStore(ABC):
    """Native dead-letter management (e.g. beanstalkd's buried jobs).

    Backends without one get the portable implementation, which consumes
    ``<queue>.dead`` like any queue.
    """

    @abstractmethod
    def list(self, limit: int) -> list[bytes]:
        """Payloads of up to ``limit`` dead letters, oldest first, without removing them."""

    @abstractmethod
    def replay(self, limit: int | None, ids: set[str] | None = None) -> int:
        """Send up to ``limit`` dead letters back to their queue with a fresh attempt count
        (only those whose message id is in ``ids``, when given); return how many."""

    @abstractmethod
    def purge(self) -> int:
        """Delete every dead letter; return how many."""


class ReplyPath(ABC):
    """A connection's way back for replies to its requests (:meth:`Backend.reply_path`).

    One per :class:`~mqprimer.Connection`, on a backend instance of its own; the portable
    layer uses it from one thread at a time and matches replies to requests by their
    envelopes' ``mqcorrelationid``, so a path only carries payloads.
    """

    #: what requests carry as ``mqreplyto``: a :meth:`Backend.send_reply` address
    address: str
    #: the protocol needs the requests published through this path (AMQP direct reply-to:
    #: same channel); otherwise the portable layer publishes them like any message
    publishes_requests: bool = False
    #: :meth:`request` may run while another thread is in :meth:`receive` (the path keeps
    #: its own order), so callers need not wait for the reader to send
    concurrent_requests: bool = False

    def request(self, destination: Queue, payload: bytes, *, message_id: str, ttl: float | None) -> None:
        """Publish one request (only called when :attr:`publishes_requests`)."""
        raise UnsupportedError("this reply path does not publish requests")

    @abstractmethod
    def receive(self, timeout: float) -> bytes | None:
        """The next reply's payload (already settled), or ``None`` after ``timeout`` seconds."""

    def loop_fd(self) -> int | None:
        """Optional: a file descriptor an event loop can watch for this path. While it is
        readable replies may be in, ``receive(0)`` takes one without waiting (``None`` when
        none is left), and reading until ``None`` re-arms it; the asyncio twin then reads
        replies on its loop, many requests in flight from one thread. ``None`` (the
        default): not offered."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Stop and remove the path from the broker (nothing of it may be left behind)."""


class QueueReplyPath(ReplyPath):
    """The portable reply path: a private queue per connection, removed on close.

    Replies carry the request's expiry (``ttl``), so after a crash nothing waits on the
    queue longer than the requests did where the broker expires messages.
    """

    def __init__(self, backend: "Backend", name: str) -> None:
        self.backend = backend
        self.address = name
        self.sub = backend.subscribe(Queue(name), prefetch=64)

    def receive(self, timeout: float) -> bytes | None:
        d = self.sub.receive(timeout)
        if d is None:
            return None
        self.sub.ack(d)
        return d.payload

    def close(self) -> None:
        try:
            self.sub.close()
        finally:
            self.backend.delete_queue(self.address)


class Backend(ABC):
    """One connection to one broker endpoint."""

    #: the capability record (an instance may refine it in ``open``, e.g. per broker flavour)
    capabilities: Capabilities
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError,)
    auth_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    #: URL query parameters the backend understands; any other one is refused
    url_params: ClassVar[frozenset[str]] = frozenset()
    #: the URL query parameter that sets :attr:`Subscription.delivery_lease` in seconds (a
    #: whole number is accepted), if the lease can be set; the conformance suite shortens the
    #: lease with it to prove that :meth:`Subscription.touch` renews it
    lease_param: ClassVar[str | None] = None

    def __init__(self, url: URL) -> None:
        self.url = url

    @abstractmethod
    def open(self) -> None:
        """Connect and authenticate; raise the library's error if that fails."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect. Must not raise if already closed or broken."""

    @abstractmethod
    def publish(
        self,
        destination: Destination,
        payload: bytes,
        *,
        message_id: str,
        priority: int | None = None,
        delay: float | None = None,
        ttl: float | None = None,
    ) -> None:
        """Hand one message to the broker (confirmed if ``confirmed_send``)."""

    def publish_many(self, items: Sequence[Outgoing]) -> None:
        """Publish several messages; return when all are confirmed. Override to batch."""
        for item in items:
            self.publish(
                item.destination,
                item.payload,
                message_id=item.message_id,
                priority=item.priority,
                delay=item.delay,
                ttl=item.ttl,
            )

    def fast_publisher(self, destination: Destination) -> tuple[bytes, Callable[[bytes], object]] | None:
        """Optional: ``(prefix, send)``, where ``send(prefix + payload)`` does what ``publish(
        destination, payload, message_id=...)`` without options does; ``None`` (the default): no such path.

        For drivers whose option-less publish is one library call on an object that stays
        valid while this backend is open (ZeroMQ's PUSH socket): the per-message call chain
        costs as much as the send itself there. The portable layer asks only after a
        ``publish`` to ``destination`` succeeded, calls ``send`` under the endpoint's lock after
        its own checks, maps its errors as ``publish``'s, and asks again after a reconnect.
        """
        return None

    def batch_publisher(self, destination: Destination) -> Callable[[list[bytes]], object] | None:
        """Optional: ``send(payloads)``, which does what ``publish(destination, payload,
        message_id=...)`` without options does for each payload, in order, in fewer library
        calls than one per message; ``None`` (the default): no such path. The payloads are this
        library's JSON envelopes (a NUL byte never occurs in one). The portable layer asks only
        where it would use :meth:`fast_publisher`, calls ``send`` under the endpoint's lock,
        and maps its errors as :meth:`fast_publisher`'s; a failure part-way leaves the payloads
        before it sent (as :meth:`publish_many`'s)."""
        return None

    def fast_error(self, exc: Exception) -> Exception:
        """What an error raised by a :meth:`fast_publisher` send means: ``exc`` itself (the
        default), or the error ``publish`` raises for the same failure. Lets a driver hand out
        its library's compiled send as it is, without a Python wrapper around every call."""
        return exc

    def nowait_publisher(self, destination: Destination) -> Callable[[bytes], bool] | None:
        """Optional: a ``send`` like :meth:`fast_publisher`'s (same frame: its prefix + payload)
        that never waits: it returns ``False`` (nothing sent) where the other would wait (a
        high-water mark, a lock another thread holds), and when it raises nothing was sent.
        ``None`` (the default): no such path. The asyncio twin sends through it on its event
        loop and takes the thread path whenever it returns ``False`` or raises.
        """
        return None

    async def publish_async(self, destination: Destination, payload: bytes, *, message_id: str) -> None:
        """Optional (see :meth:`Subscription.receive_async`): ``publish`` without options,
        awaited on the event loop, called with the endpoint's lock held. NotNow (the default:
        not offered): nothing sent. Another error: as ``publish``'s (the portable layer maps
        it, reconnects and sends again). Cancelled mid-way: the message may have been sent,
        and a connection left out of step with its replies is dropped."""
        raise NotNow("not offered")

    @abstractmethod
    def subscribe(
        self, destination: Destination, *, prefetch: int, subscription: str | None = None
    ) -> Subscription:
        """Start receiving from ``destination``.

        ``subscription`` names a durable topic subscription (it keeps messages while no
        consumer is attached); ``None`` means a private one that ends with the consumer.
        """

    def status(self, message_id: str) -> Status:
        """Where message ``message_id`` is (only if ``capabilities.status``)."""
        raise UnsupportedError(f"the {self.capabilities.name} backend cannot report message status")

    def stats(self, destination: Queue) -> QueueStats:
        """Counts for queue ``destination`` (only if ``capabilities.stats``); ``None`` for what
        the broker cannot tell. A queue the broker has never seen has all counts 0."""
        raise UnsupportedError(f"the {self.capabilities.name} backend cannot report queue stats")

    def reply_path(self, name: str) -> ReplyPath:
        """A reply path on this backend instance (which serves nothing else); ``name`` is a
        fresh private queue name. Backends with a native path override this and declare
        ``request_reply`` NATIVE; the default is :class:`QueueReplyPath` (EMULATED)."""
        return QueueReplyPath(self, name)

    def reply_sharer(self) -> "Backend | None":
        """A backend for its connection's reply path that shares this one's broker connection
        (its own channels on it), or ``None``: the reply path opens a connection of its own.
        Its ``open()`` and ``close()`` must neither open nor close the shared connection;
        ``open()`` raises a connection error when that connection is gone."""
        return None

    def send_reply(self, address: str, payload: bytes, *, message_id: str, ttl: float | None) -> None:
        """Send one reply to a request's reply address; ``ttl`` only if ttl is NATIVE.

        A driver that sets :attr:`Delivery.correlation_id` also takes ``correlation_id=`` (the
        request's, for the protocol's own field; the envelope carries it too).
        """
        self.publish(Queue(address), payload, message_id=message_id, ttl=ttl)

    def delete_queue(self, name: str) -> None:
        """Remove a private reply queue and what is left in it (used by :class:`QueueReplyPath`)."""
        return None

    def dead_letter_store(self, queue: str) -> DeadLetterStore | None:
        """A native dead-letter store for ``queue``, or ``None`` for the portable one."""
        return None

    def server_info(self) -> dict[str, str]:
        """What the broker says about itself (version, settings that decide durability), as
        short ``topic: text`` lines for ``mqprimer doctor``; empty when there is nothing."""
        return {}
