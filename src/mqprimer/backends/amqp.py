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
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    Delivery,
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
from ._amqp_link import URL_PARAMS, Confirmer, Link, Options, coalesce, parameters, refused
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
    confirmed_send=True,
    persistent=True,
    guarantee="at-least-once",
    max_message_size=128 * 1024 * 1024,
    size_limit_hint="max_message_size in rabbitmq.conf, at most 512 MiB",
    notes="RabbitMQ: classic durable queues, publisher confirms, TTL-queue delays; "
    "retry and dead letters republish then ack",
)
_REDECLARE = 300.0  # seconds before a delay bucket is declared again (it expires 600 s after)


@dataclass(frozen=True)
class SubQueue(Queue):
    """A subscription's own queue: exists already (maybe exclusive to another connection)."""


def bucket_ms(delay: float) -> int:
    """The delay bucket for ``delay`` seconds, rounded up (never early)."""
    ms = max(1, math.ceil(delay * 1000 - 1e-6))
    if ms <= 100:
        return ms
    step = 10 ** (len(str(ms)) - 2)
    rounded: int = -(-ms // step) * step
    return rounded


class AmqpBackend(Backend):
    capabilities = CAPABILITIES
    # AMQPConnectorException: pika's connect-phase errors (e.g. a handshake timeout on a frozen broker)
    connection_errors = (
        px.AMQPConnectionError, AMQPConnectorException, px.ChannelWrongStateError, px.ConsumerCancelled, OSError,
    )
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
        self._reply_ch: Any = None  # a plain channel for replies (send_reply)
        self._declared: dict[str, float] = {}

    def open(self) -> None:
        self._link = Link(parameters(self.url, self.opts, "mqprimer producer"), self.opts.heartbeat)
        with self._link.lock:
            self._confirmer()

    def close(self) -> None:
        link, self._link, self._pub, self._reply_ch = self._link, None, None, None
        if link is not None:
            link.close()

    def _confirmer(self) -> Confirmer:
        if self._pub is None or self._pub.closed is not None:
            assert self._link is not None
            self._pub = Confirmer(self._link)
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
        link = self._link
        if link is None:
            raise px.ConnectionWrongStateError("the AMQP backend is closed")
        with link.lock:
            if link.error is not None:
                raise link.error
            try:
                pub = self._confirmer()
                pub.publish([self._route(pub, *item) for item in items])
            except px.UnroutableError:
                assert self._pub is not None
                for r in self._pub.returned:  # a queue deleted behind our back: declare it next time
                    self._declared.pop("q:" + r.method.routing_key, None)
                    self._declared.pop("b:" + r.method.exchange, None)
                raise
            except px.AMQPChannelError as exc:
                raise refused(exc) from None

    def _route(
        self, pub: Confirmer, dest: Destination, payload: bytes, mid: str,
        priority: int | None, delay: float | None, ttl: float | None,
    ) -> tuple[str, str, bytes, BasicProperties, bool]:
        expiration = None
        if ttl and not delay:  # a per-message TTL would expire in the delay bucket: the envelope's expiry covers it
            expiration = str(max(1, int(ttl * 1000)))
        props = BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2, message_id=mid, priority=priority, expiration=expiration
        )
        if isinstance(dest, Topic):
            self._declare_exchange(pub)
            exchange, dlx, mandatory = self.opts.exchange, self.opts.exchange, False
        else:
            if not isinstance(dest, SubQueue):
                self._declare_queue(pub, dest.name)
            exchange, dlx, mandatory = "", "", True
        if delay:
            exchange, mandatory = self._declare_bucket(pub, delay, dlx), True
        return exchange, dest.name, payload, props, mandatory

    def _declare_queue(self, pub: Confirmer, name: str) -> None:
        if "q:" + name not in self._declared:
            pub.channel.queue_declare(name, durable=True, arguments=self.queue_args)
            self._declared["q:" + name] = time.monotonic()

    def _declare_exchange(self, pub: Confirmer) -> None:
        if "x:" not in self._declared:
            pub.channel.exchange_declare(self.opts.exchange, "topic", durable=True)
            self._declared["x:"] = time.monotonic()

    def _declare_bucket(self, pub: Confirmer, delay: float, dlx: str) -> str:
        ms = bucket_ms(delay)
        name = f"{dlx or 'mqprimer'}.delay.{ms}"
        now = time.monotonic()
        if now - self._declared.get("b:" + name, -math.inf) > _REDECLARE:
            ch = pub.channel
            ch.exchange_declare(name, "fanout", durable=True, auto_delete=True)
            ch.queue_declare(name, durable=True, arguments={
                "x-message-ttl": ms, "x-dead-letter-exchange": dlx, "x-expires": ms + 2 * int(_REDECLARE * 1000),
            })
            ch.queue_bind(name, name)
            self._declared["b:" + name] = now
        return name

    # -- request/reply ----------------------------------------------------------------
    def reply_path(self, name: str) -> ReplyPath:
        assert self._link is not None
        return DirectReplyPath(self._link, self.queue_args)

    def send_reply(
        self, address: str, payload: bytes, *, message_id: str, ttl: float | None, correlation_id: str | None = None
    ) -> None:
        link = self._link
        if link is None:
            raise px.ConnectionWrongStateError("the AMQP backend is closed")
        props = BasicProperties(content_type=CONTENT_TYPE, message_id=message_id, correlation_id=correlation_id,
                                expiration=str(max(1, int(ttl * 1000))) if ttl else None)
        with link.lock:
            if link.error is not None:
                raise link.error
            try:
                ch = self._reply_ch
                if ch is None or not ch.is_open:
                    ch = self._reply_ch = link.conn.channel()
                # unconfirmed, not mandatory: like the reply path itself, a reply lives only as
                # long as its caller waits (a lost one is the caller's Timeout), and a confirm
                # would cost a round trip per call for nothing the caller could use
                ch.basic_publish("", address, payload, props)
            except px.AMQPChannelError as exc:
                raise refused(exc) from None

    def stats(self, destination: Queue) -> QueueStats:
        link = self._link
        if link is None:
            raise px.ConnectionWrongStateError("the AMQP backend is closed")
        counts: list[tuple[int, int]] = []
        with link.lock:
            if link.error is not None:
                raise link.error
            for name in (destination.name, f"{destination.name}.dead"):
                # a channel each: the broker closes the channel that asks for a missing queue
                ch = link.conn.channel()
                try:
                    ok = ch.queue_declare(name, passive=True).method
                    counts.append((ok.message_count, ok.consumer_count))
                except px.ChannelClosedByBroker as exc:
                    if exc.reply_code != 404:
                        raise refused(exc) from None
                    counts.append((0, 0))  # never declared: nothing in it
                finally:
                    if ch.is_open:
                        ch.close()
        (ready, consumers), (dead, _) = counts
        return QueueStats(destination.name, ready=ready, delayed=None, reserved=None, dead=dead, consumers=consumers)

    # -- consuming --------------------------------------------------------------------
    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        # its own connection: pika connections are single-threaded, and a consumer may
        # run in another thread than the producer
        return AmqpSubscription(self, destination, prefetch, subscription)


class AmqpSubscription(Subscription):
    def __init__(self, backend: AmqpBackend, destination: Destination, prefetch: int, name: str | None) -> None:
        opts = backend.opts
        self.destination = destination
        self._buf: deque[Delivery] = deque()
        # acks are written in batches (see ack); this many may wait for the next one
        self._ack_batch = max(1, prefetch // 4)
        self._link = link = Link(parameters(backend.url, opts, f"mqprimer consumer {destination}"), opts.heartbeat)
        try:
            with link.lock:  # the keeper thread must not pump the connection while we declare
                self._setup(backend, destination, prefetch, name)
        except px.AMQPChannelError as exc:
            link.close()
            raise refused(exc) from None
        except BaseException:
            link.close()
            raise

    def _setup(self, backend: AmqpBackend, destination: Destination, prefetch: int, name: str | None) -> None:
        opts = backend.opts
        ch = self._ch = self._link.conn.channel()
        self._impl = ch._impl  # pika's async channel: basic_ack without a flush per ack
        ch.basic_qos(prefetch_count=prefetch)
        if isinstance(destination, Topic):
            qname = name or f"mqprimer.sub.{uuid.uuid4().hex}"
            ch.exchange_declare(opts.exchange, "topic", durable=True)
            ch.queue_declare(qname, durable=name is not None, exclusive=name is None,
                             auto_delete=name is None, arguments=backend.queue_args)
            ch.queue_bind(qname, opts.exchange, routing_key=destination.name)
            self.retry_target: Destination = SubQueue(qname)
        else:
            qname = destination.name
            ch.queue_declare(qname, durable=True, arguments=backend.queue_args)
            self.retry_target = destination
        self.dead_target = Queue(f"{qname}.dead")
        ch.basic_consume(qname, self._on_message)

    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self._buf.append(Delivery(body, method.delivery_tag, 0, method.redelivered, props.reply_to,
                                  props.correlation_id))

    def receive(self, timeout: float | None) -> Delivery | None:
        link, buf = self._link, self._buf
        with link.lock:
            if link.error is not None:  # what is buffered will be redelivered: do not hand it out
                raise link.error
            if buf:
                if link.unflushed >= self._ack_batch:
                    link.flush()
                return buf.popleft()
            coalesce(link.conn)
            link.unflushed = 0  # process_data_events writes everything out first
            if timeout is None:
                while not buf:
                    link.conn.process_data_events(time_limit=1.0)
            else:
                link.conn.process_data_events(time_limit=timeout)
            return buf.popleft() if buf else None

    def ack(self, delivery: Delivery) -> None:
        """Ack. While more prefetched messages wait, the frame leaves with the next batch
        of acks (every ``prefetch / 4``, when the consumer next waits or closes, or within
        0.2 s by the keeper thread); when none waits, at once.

        Batching saves a send() per message on busy queues. A process killed inside that
        window gets the message redelivered: at-least-once either way.
        """
        link = self._link
        with link.lock:
            if link.error is not None:
                raise link.error
            self._impl.basic_ack(delivery.tag)
            link.unflushed += 1
            if not self._buf or not link.keeper:
                link.flush()

    def requeue(self, delivery: Delivery) -> None:
        link = self._link
        with link.lock:
            if link.error is not None:
                raise link.error
            self._ch.basic_nack(delivery.tag, requeue=True)

    def close(self) -> None:
        # closing the connection hands every unacked delivery (buffered ones too) back
        self._buf.clear()
        self._link.close()
