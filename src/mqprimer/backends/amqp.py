"""``amqp://`` and ``amqps://``: AMQP 0-9-1 on RabbitMQ through pika.

``amqp://user:password@host:5672/vhost?heartbeat=10&max_priority=9``
``amqps://user:password@host:5671/?cafile=ca.pem&certfile=client.pem&keyfile=client.key``

What mqprimer declares on the broker (all durable unless said otherwise):

- a queue ``q`` is a classic queue named ``q`` on the default exchange, with
  ``x-max-priority`` (URL ``max_priority``, default 9; 0 declares none and refuses
  priority). Messages are persistent (``delivery_mode=2``) and published with
  publisher confirms, always.
- topics go through one topic exchange (URL ``exchange``, default ``mqprimer.topic``);
  the routing key is the topic name, so ``*`` and ``#`` patterns are RabbitMQ's own. A
  named subscription is a durable queue of that name bound to the exchange; an unnamed
  one is an exclusive, auto-delete queue ``mqprimer.sub.<random>``.
- delays use one TTL queue per delay bucket, ``mqprimer.delay.<ms>`` (topics:
  ``<exchange>.delay.<ms>``), fed by a fanout exchange of the same name and
  dead-lettering to the default exchange (topics: the topic exchange) with the original
  routing key. Buckets round the delay up (2 significant digits above 100 ms: never
  early, at most 10 % late) and expire 10 minutes after their last use.
- dead letters are ``<queue>.dead`` queues; retry and dead letters are the portable
  emulation (publish the new copy with confirms, then ack), because the dead letter has
  to carry the reason and attempt count in its envelope, which a broker-side DLX cannot add.

Classic queues, not quorum queues: quorum queues refuse ``x-max-priority`` on 3.10 and
expire per-message TTL differently; classic queues live on one node (no replication).

One AMQP connection per backend instance (per endpoint of a ``Connection``), run by one
I/O thread (``_amqp_link``): publishing on a confirm channel, each subscription on a
channel of its own (``_amqp_channels``). A channel error ends that channel only.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pika.exceptions as px
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from pika.spec import BasicProperties

from ..backend import (
    EMULATED,
    NATIVE,
    UNSUPPORTED,
    Backend,
    Capabilities,
    Destination,
    Outgoing,
    Queue,
    QueueStats,
    ReplyPath,
    Subscription,
    Topic,
)
from ..envelope import CONTENT_TYPE
from ..url import URL
from ._amqp_channels import AmqpSubscription, Confirmer, SubQueue
from ._amqp_link import URL_PARAMS, Chan, Link, Options, parameters, refused
from ._amqp_out import publish_frames
from ._amqp_reply import DirectReplyPath

CAPABILITIES = Capabilities(
    name="amqp",
    queue=NATIVE,
    topic=NATIVE,
    patterns=NATIVE,
    priority=NATIVE,
    delay=NATIVE,
    ttl=NATIVE,
    retry=EMULATED,
    dead_letter=EMULATED,
    status=UNSUPPORTED,
    request_reply=NATIVE,  # RabbitMQ direct reply-to (backends/_amqp_reply.py)
    # passive queue.declare: ready and consumers of the queue, ready of <queue>.dead; AMQP does
    # not tell unacked counts, and delay buckets are shared by every queue (both None)
    stats=NATIVE,
    shared_subscription=NATIVE,  # a named subscription is one durable queue; its consumers compete for it
    nowait=("poll", "ack"),  # deliveries wait in a local queue; an ack is buffered for the I/O thread
    confirmed_send=True,
    persistent=True,
    guarantee="at-least-once",
    max_message_size=128 * 1024 * 1024,
    size_limit_hint="max_message_size in rabbitmq.conf, at most 512 MiB",
    notes="RabbitMQ: classic durable queues, publisher confirms, TTL-queue delays; "
    "retry and dead letters republish then ack",
)
_REDECLARE = 300.0  # seconds before a delay bucket is declared again (it expires 600 s after)


def bucket_ms(delay: float) -> int:
    """The delay bucket for ``delay`` seconds, rounded up (never early)."""
    ms = max(1, math.ceil(delay * 1000 - 1e-6))
    if ms <= 100:
        return ms
    step = 10 ** (len(str(ms)) - 2)
    rounded: int = -(-ms // step) * step
    return rounded


class AmqpBackend(Backend):
    """One AMQP connection (a :class:`Link`): a confirm channel for publishing, a channel per
    subscription, one for replies; all driven by the link's I/O thread."""

    capabilities = CAPABILITIES
    # AMQPConnectorException: pika's connect-phase errors (e.g. a handshake timeout on a frozen
    # broker). Not ConsumerCancelled nor ChannelClosedByBroker: they end one channel, and the
    # connection with every other subscription on it stays up (a BrokerError for that one)
    connection_errors = (px.AMQPConnectionError, AMQPConnectorException, px.ChannelWrongStateError, OSError)
    auth_errors = (px.ProbableAuthenticationError, px.ProbableAccessDeniedError, px.AuthenticationError)
    url_params = URL_PARAMS

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        self.opts = Options.from_url(url)
        if not self.opts.max_priority:
            self.capabilities = replace(CAPABILITIES, priority=UNSUPPORTED)
        self.queue_args: dict[str, Any] = {"x-max-priority": self.opts.max_priority} if self.opts.max_priority else {}
        self._link: Link | None = None
        self._pub: Confirmer | None = None
        self._reply_ch: Chan | None = None  # a plain channel for replies (send_reply)
        self._reply_queued: deque[None] = deque()  # replies handed to the I/O thread, not yet in pika's buffer
        self._declared: dict[str, float] = {}

    def open(self) -> None:
        self._link = Link(parameters(self.url, self.opts, "mqprimer"))
        self._confirmer()

    def close(self) -> None:
        link, self._link, self._pub, self._reply_ch = self._link, None, None, None
        if link is not None:
            link.close()

    def _alive(self) -> Link:
        link = self._link
        if link is None:
            raise px.ConnectionWrongStateError("the AMQP backend is closed")
        if link.error is not None:
            raise link.error
        return link

    def _confirmer(self) -> Confirmer:
        if self._pub is None or self._pub.closed is not None:
            self._declared.clear()  # declarations are nowait: the one that closed the channel may be among them
            self._pub = Confirmer(self._alive())
        return self._pub

    # -- publishing -------------------------------------------------------------------
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
        self._send([(destination, payload, message_id, priority, delay, ttl)])

    def publish_many(self, items: Sequence[Outgoing]) -> None:
        self._send([(i.destination, i.payload, i.message_id, i.priority, i.delay, i.ttl) for i in items])

    def _send(self, items: list[tuple[Destination, bytes, str, int | None, float | None, float | None]]) -> None:
        self._alive()
        try:
            pub = self._confirmer()
            ops: list[Callable[[Any], None]] = []
            pub.publish(ops, [self._route(ops, *item) for item in items])
        except px.UnroutableError:
            assert self._pub is not None
            for r in self._pub.returned:  # a queue deleted behind our back: declare it next time
                self._declared.pop("q:" + r.method.routing_key, None)
                self._declared.pop("b:" + r.method.exchange, None)
            raise
        except px.AMQPChannelError as exc:
            raise refused(exc) from None

    def _route(
        self, ops: list[Callable[[Any], None]], dest: Destination, payload: bytes, mid: str,
        priority: int | None, delay: float | None, ttl: float | None,
    ) -> tuple[str, str, bytes, BasicProperties, bool]:
        expiration = None
        if ttl and not delay:  # a per-message TTL would expire in the delay bucket: the envelope's expiry covers it
            expiration = str(max(1, int(ttl * 1000)))
        props = BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2, message_id=mid, priority=priority, expiration=expiration
        )
        if isinstance(dest, Topic):
            self._declare_exchange(ops)
            exchange, dlx, mandatory = self.opts.exchange, self.opts.exchange, False
        else:
            if not isinstance(dest, SubQueue):
                self._declare_queue(ops, dest.name)
            exchange, dlx, mandatory = "", "", True
        if delay:
            exchange, mandatory = self._declare_bucket(ops, delay, dlx), True
        return exchange, dest.name, payload, props, mandatory

    # nowait declarations, sent before the publishes that need them: the broker applies them
    # in order, and one it refuses closes the channel, which fails the publish with its reason
    def _declare_queue(self, ops: list[Callable[[Any], None]], name: str) -> None:
        if "q:" + name not in self._declared:
            args = self.queue_args
            ops.append(lambda ch: ch.queue_declare(name, durable=True, arguments=args))
            self._declared["q:" + name] = time.monotonic()

    def _declare_exchange(self, ops: list[Callable[[Any], None]]) -> None:
        if "x:" not in self._declared:
            x = self.opts.exchange
            ops.append(lambda ch: ch.exchange_declare(x, "topic", durable=True))
            self._declared["x:"] = time.monotonic()

    def _declare_bucket(self, ops: list[Callable[[Any], None]], delay: float, dlx: str) -> str:
        ms = bucket_ms(delay)
        name = f"{dlx or 'mqprimer'}.delay.{ms}"
        now = time.monotonic()
        if now - self._declared.get("b:" + name, -math.inf) > _REDECLARE:
            args = {"x-message-ttl": ms, "x-dead-letter-exchange": dlx, "x-expires": ms + 2 * int(_REDECLARE * 1000)}

            def declare(ch: Any) -> None:
                ch.exchange_declare(name, "fanout", durable=True, auto_delete=True)
                ch.queue_declare(name, durable=True, arguments=args)
                ch.queue_bind(name, name)

            ops.append(declare)
            self._declared["b:" + name] = now
        return name

    # -- request/reply ----------------------------------------------------------------
    def reply_path(self, name: str) -> ReplyPath:
        return DirectReplyPath(self._alive(), self.queue_args)

    def reply_sharer(self) -> "AmqpBackend":
        return _SharedLink(self)

    def send_reply(
        self, address: str, payload: bytes, *, message_id: str, ttl: float | None, correlation_id: str | None = None
    ) -> None:
        link = self._alive()
        props = BasicProperties(content_type=CONTENT_TYPE, message_id=message_id, correlation_id=correlation_id,
                                expiration=str(max(1, int(ttl * 1000))) if ttl else None)
        chan = self._reply_ch
        if chan is None or chan.closed is not None:
            chan = Chan(link)
            chan.run(chan.open_step)
            self._reply_ch = chan

        queued = self._reply_queued

        # unconfirmed, not mandatory, not waited for: like the reply path itself, a reply lives
        # only as long as its caller waits (a lost one is the caller's Timeout), and a confirm
        # would cost a round trip per call for nothing the caller could use. Sent from this
        # thread if the socket is idle (_amqp_out): no wake-up of the I/O thread
        def frames() -> bytes | None:
            ch = chan.ch
            if queued or chan.closed is not None or not ch.is_open:
                return None
            return publish_frames(ch.channel_number, "", address, payload, props, link.conn._body_max_length)

        if not link.backlog and link.out.direct(frames):  # a busy service's replies go out together
            return

        def send() -> None:
            if chan.ch.is_open:
                chan.ch.basic_publish("", address, payload, props)

        link.submit_ordered(queued, send)

    def stats(self, destination: Queue) -> QueueStats:
        link = self._alive()
        counts: list[tuple[int, int]] = []
        for name in (destination.name, f"{destination.name}.dead"):
            # a channel each: the broker closes the channel that asks for a missing queue
            chan = Chan(link)

            def passive(ch: Any, done: Callable[[Any], None], name: str = name) -> None:
                ch.queue_declare(name, passive=True, callback=done)

            try:
                ok = chan.run(chan.open_step, passive).method
                counts.append((ok.message_count, ok.consumer_count))
            except px.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise refused(exc) from None
                counts.append((0, 0))  # never declared: nothing in it
            finally:
                chan.close()
        (ready, consumers), (dead, _) = counts
        return QueueStats(destination.name, ready=ready, delayed=None, reserved=None, dead=dead, consumers=consumers)

    # -- consuming --------------------------------------------------------------------
    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        return AmqpSubscription(self._alive(), destination, prefetch, subscription, self.opts.exchange,
                                self.queue_args)


class _SharedLink(AmqpBackend):
    """A Connection's reply path on that Connection's own AMQP connection (one connection per
    endpoint): channels of its own on the owner's link, which it neither opens nor closes."""

    def __init__(self, owner: AmqpBackend) -> None:
        super().__init__(owner.url)
        self._owner = owner

    def open(self) -> None:
        self._link = self._owner._alive()

    def close(self) -> None:
        chans = (self._pub, self._reply_ch)
        self._link, self._pub, self._reply_ch = None, None, None
        for chan in chans:
            if chan is not None:
                chan.close()
