"""``stomp://`` and ``stomp+ssl://``: STOMP 1.2 through stomp.py, on RabbitMQ or ActiveMQ.

``stomp://user:pass@host:61613/[vhost]?flavour=auto|rabbitmq|activemq&heartbeat=4&io_timeout=30``
``stomp+ssl://user:pass@host:61614/?cafile=ca.pem&certfile=c.pem&keyfile=c.key&verify=true``

One backend, two brokers that behave differently; the flavour comes from the CONNECTED
frame's ``server`` header (or ``flavour=``) and picks the capability record and the
headers below. What mqprimer does about each difference:

- queues are ``/queue/NAME``, topics ``/topic/NAME``. RabbitMQ matches AMQP patterns
  (``*``, ``#``) itself; on ActiveMQ ``*`` stays ``*``, a final ``#`` becomes ``>``, and a
  ``#`` elsewhere subscribes to the widest ActiveMQ wildcard that covers it and drops the
  copies that do not match the exact pattern (they are this subscription's own copies).
- every SEND carries ``persistent:true`` and a ``receipt``: ``publish`` returns when the
  broker has the message; ``publish_many`` sends the whole batch, then waits for all.
  Requests and replies go without both: transient, as they live only as long as their caller.
- retry and dead letters are emulated on both (publish a copy, then ACK): NACK requeues for
  ever on RabbitMQ and goes to ``ActiveMQ.DLQ`` on ActiveMQ.
- delay: ActiveMQ's scheduler (``AMQ_SCHEDULED_DELAY``); on RabbitMQ a per-delay TTL queue
  ``mqprimer.delay.<ms>.<queue>`` that dead-letters back into the queue.
- priority: ``priority`` header; RabbitMQ needs the queue declared with ``x-max-priority``,
  so every ``/queue/`` frame carries the same arguments (RabbitMQ refuses a queue touched
  with different ones). TTL: ``expiration`` (relative ms) vs ``expires`` (absolute ms).
- a topic subscription also listens on a queue of its own (the subscription name, or
  ``mqprimer.sub.<random>``) that receives its retries; its dead letters go to
  ``<that queue>.dead``.
- a named subscription is shared by all its consumers (a consumer group). RabbitMQ: a
  durable SUBSCRIBE whose ``id`` is the name (same destination and id, same queue).
  ActiveMQ: virtual topics, its own mechanism for this; topics are sent to
  ``/topic/VirtualTopic.<name>`` and a named subscription consumes the queue
  ``Consumer.<name>.VirtualTopic.<pattern>`` (dots in the name become ``~``: ActiveMQ's
  ``Consumer.*.`` prefix takes one word), which the broker fills while nobody consumes.
- one STOMP connection per backend carries the sends and every subscription (ids, ack mode
  and prefetch of its own; closing one UNSUBSCRIBEs it and gives back what it held), except
  where a connection of its own is needed (docs/backend-stomp.md, "Connection model").
- ``io_timeout`` (seconds, default 30): how long a receipt may take, and a CONNECT (at most
  15 s); past it the connection counts as lost (a hung broker surfaces as ConnectionFailed).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from stomp.exception import StompException

from .._ids import prepare
from ..backend import (
    EMULATED,
    NATIVE,
    UNSUPPORTED,
    Backend,
    Capabilities,
    Delivery,
    Destination,
    NotNow,
    Outgoing,
    Queue,
    ReplyPath,
    Subscription,
    Topic,
)
from ..errors import ConfigurationError, UnsupportedError
from ..topics import matches
from . import _stomp_aio
from ._stomp_link import RECEIPT_TIMEOUT, ConnectionLost, Link, StompAuthError, StompBrokerError
from ._stomp_reply import StompReplyPath
from ._stomp_wire import Inbox, encode_frame

_COMMON = dict(
    topic=NATIVE, retry=EMULATED, dead_letter=EMULATED, status=UNSUPPORTED,
    confirmed_send=True, guarantee="at-least-once",
    # deliveries wait in the link's inboxes (the receiver thread fills them); an ACK is queued and
    # written with MSG_DONTWAIT or by the link's flusher thread, never waited for (_stomp_acks.py)
    nowait=("poll", "ack"),
)
CAPABILITIES_RABBITMQ = Capabilities(
    name="stomp-rabbitmq", patterns=NATIVE, priority=NATIVE, delay=NATIVE, ttl=NATIVE, persistent=True,
    request_reply=NATIVE,  # /temp-queue/ reply queues (_stomp_reply.py)
    shared_subscription=NATIVE,  # a durable SUBSCRIBE: one queue per destination and id
    notes="RabbitMQ STOMP plugin: AMQP topic patterns, x-max-priority queues, delay by TTL queues that "
    "dead-letter back; retry and dead letters (<queue>.dead) by republish then ACK",
    **_COMMON,  # type: ignore[arg-type]
)
CAPABILITIES_ACTIVEMQ = Capabilities(
    name="stomp-activemq", patterns=EMULATED, priority=NATIVE, delay=NATIVE, ttl=NATIVE, persistent=True,
    request_reply=NATIVE,  # /temp-queue/ reply queues (_stomp_reply.py)
    shared_subscription=NATIVE,  # virtual topics: queue Consumer.<name>.VirtualTopic.<pattern>
    notes="ActiveMQ 5.x: needs schedulerSupport (delay) and prioritizedMessages (priority); '#' other than "
    "last is matched by filtering a wider '>' subscription; topics are virtual topics (VirtualTopic.<name>), "
    "a named subscription the queue Consumer.<name>.VirtualTopic.<pattern>; retry and dead letters "
    "(<queue>.dead) by republish then ACK, never NACK (it sends to ActiveMQ.DLQ)",
    **_COMMON,  # type: ignore[arg-type]
)
#: any other STOMP broker: only what STOMP itself guarantees
CAPABILITIES = Capabilities(
    name="stomp", patterns=UNSUPPORTED, priority=UNSUPPORTED, delay=UNSUPPORTED, ttl=EMULATED, persistent=False,
    notes="generic STOMP 1.2 broker (flavour not recognised): queues, topics, receipts",
    **_COMMON,  # type: ignore[arg-type]
)
CAPABILITY_ROWS = (CAPABILITIES_RABBITMQ, CAPABILITIES_ACTIVEMQ)  # the matrix: one row per flavour
FLAVOURS = {"rabbitmq": CAPABILITIES_RABBITMQ, "activemq": CAPABILITIES_ACTIVEMQ, "generic": CAPABILITIES}

_MAX_PRIORITY = "9"
_DELAY_PREFIX = "mqprimer.delay."
_DELAY_TOPIC_PREFIX = "mqprimer.delay-topic."
_SUB_PREFIX = "mqprimer.sub."
# ActiveMQ's default virtual topics (VirtualTopic.>, consumer queues Consumer.*.VirtualTopic.>)
_VT = "VirtualTopic."
_GROUP_ID = "/group"  # SUBSCRIBE ids of a named subscription's queue on ActiveMQ start with it
_DELAY_QUEUE_IDLE_MS = 60_000  # RabbitMQ deletes an unused delay queue after this
_PRIVATE_QUEUE_IDLE_MS = 600_000  # ... and an abandoned private topic-retry queue after this


class StompBackend(Backend):
    capabilities = CAPABILITIES
    connection_errors = (StompException, OSError)
    auth_errors = (StompAuthError,)
    url_params = frozenset({"flavour", "heartbeat", "vhost", "cafile", "certfile", "keyfile", "verify", "io_timeout"})

    def __init__(self, url: Any) -> None:
        super().__init__(url)
        self.io_timeout = self.url.seconds("io_timeout", RECEIPT_TIMEOUT)
        self.flavour = "generic"
        self.link: Link | None = None
        self.links: set[Link] = set()
        self.declared: set[str] = set()  # RabbitMQ queues known to exist (delayed sends need them)
        self._reply_link: Link | None = None  # replies (send_reply) go out on a connection of their own

    # -- connections -----------------------------------------------------------------
    def new_link(self, client_id: str | None = None) -> Link:
        u = self.url
        tls = u.scheme == "stomp+ssl"
        p = u.params
        ssl: dict[str, Any] | None = None
        if tls:
            verify = p.get("verify", "true").lower() not in ("0", "false", "no")
            ssl = {"ca_certs": p.get("cafile"), "cert_file": p.get("certfile"), "key_file": p.get("keyfile"),
                   "verify": verify}
        try:
            heartbeat_ms = int(float(p.get("heartbeat", "4")) * 1000)
        except ValueError:
            raise ConfigurationError(f"{u}: heartbeat must be a number of seconds") from None
        vhost = p.get("vhost") or (u.path.lstrip("/") or "/")
        extra = {"client-id": client_id} if client_id else None
        link = Link(u.host or "127.0.0.1", u.port or (61614 if tls else 61613), login=u.username,
                    passcode=u.password, vhost=vhost, heartbeat_ms=heartbeat_ms, ssl=ssl,
                    extra_connect_headers=extra, io_timeout=self.io_timeout)
        self.links.add(link)
        try:
            link.open()
        except BaseException:
            self.drop(link)
            raise
        return link

    def drop(self, link: Link) -> None:
        self.links.discard(link)
        link.close()

    def open(self) -> None:
        flavour = (self.url.param("flavour") or "auto").lower()
        if flavour not in ("auto", *FLAVOURS):
            raise ConfigurationError(f"{self.url}: flavour must be auto, rabbitmq, activemq or generic")
        self.link = self.new_link()
        if flavour == "auto":
            server = self.link.server.lower()
            flavour = "rabbitmq" if "rabbitmq" in server else "activemq" if "activemq" in server else "generic"
        self.flavour = flavour
        self.capabilities = FLAVOURS[flavour]

    def close(self) -> None:
        for link in list(self.links):
            self.drop(link)
        self.link = self._reply_link = None

    def main(self) -> Link:
        if self.link is None:
            raise ConnectionLost("the backend is closed")
        return self.link

    # -- destinations and headers ------------------------------------------------------
    def queue_headers(self, name: str) -> dict[str, str]:
        """RabbitMQ declares a queue on every /queue/ frame: always the same arguments per name."""
        if self.flavour != "rabbitmq":
            return {}
        for prefix, exchange in ((_DELAY_PREFIX, ""), (_DELAY_TOPIC_PREFIX, "amq.topic")):
            if name.startswith(prefix):
                # dead-letters into the queue (default exchange) or the topic (STOMP's amq.topic)
                ms, _, target = name[len(prefix):].partition(".")
                return {"x-message-ttl": ms, "x-dead-letter-exchange": exchange, "x-dead-letter-routing-key": target,
                        "x-expires": str(int(ms) + _DELAY_QUEUE_IDLE_MS)}
        h = {"x-max-priority": _MAX_PRIORITY}
        if name.startswith(_SUB_PREFIX):
            h["x-expires"] = str(_PRIVATE_QUEUE_IDLE_MS)
        return h

    def send_headers(self, item: Outgoing) -> dict[str, str]:
        dest = item.destination
        h: dict[str, str] = {"persistent": "true", "content-type": "application/cloudevents+json"}
        delay_ms = int(-(-(item.delay or 0) * 1000 // 1))  # rounded up: never early
        if delay_ms and self.flavour == "rabbitmq":
            prefix = _DELAY_TOPIC_PREFIX if isinstance(dest, Topic) else _DELAY_PREFIX
            name = f"{prefix}{delay_ms}.{dest.name}"
            h["destination"] = f"/queue/{name}"
            h.update(self.queue_headers(name))
        elif isinstance(dest, Topic):
            h["destination"] = f"/topic/{_VT if self.flavour == 'activemq' else ''}{dest.name}"
        else:
            h["destination"] = f"/queue/{dest.name}"
            h.update(self.queue_headers(dest.name))
        if delay_ms and self.flavour == "activemq":
            h["AMQ_SCHEDULED_DELAY"] = str(delay_ms)
        if item.priority is not None or self.flavour == "activemq":
            # JMS defaults to 4; mqprimer's default (no priority) is the lowest, 0
            h["priority"] = str(item.priority or 0)
        if item.ttl is not None:
            if self.flavour == "activemq":
                h["expires"] = str(int((time.time() + (item.delay or 0) + item.ttl) * 1000))
            elif self.flavour == "rabbitmq" and not delay_ms:
                # a delayed message loses its expiration when dead-lettered out of the delay
                # queue; the envelope's expiry check covers it
                h["expiration"] = str(max(1, int(item.ttl * 1000)))
        return h

    # -- publishing ----------------------------------------------------------------------
    def publish(
        self, destination: Destination, payload: bytes, *, message_id: str,
        priority: int | None = None, delay: float | None = None, ttl: float | None = None,
    ) -> None:
        self.publish_many([Outgoing(destination, payload, message_id, priority, delay, ttl)])

    def publish_many(self, items: Sequence[Outgoing]) -> None:
        link = self.main()
        for it in items:
            if it.delay and self.flavour == "rabbitmq" and isinstance(it.destination, Queue):
                self.ensure_queue(it.destination.name)
        rids = []
        frames = []
        for it in items:
            rid = link.next_id()
            headers = self.send_headers(it)
            headers["receipt"] = rid
            frames.append(encode_frame("SEND", headers, it.payload))
            rids.append(rid)
        link.write(b"".join(frames))  # the whole batch in one write, then wait for every receipt
        prepare()  # the next message's id, made while the broker works (see _ids)
        link.wait_receipts(rids)
        for it in items:
            if isinstance(it.destination, Queue) and not it.delay:
                self.declared.add(it.destination.name)

    async def publish_async(self, destination: Destination, payload: bytes, *, message_id: str) -> None:
        link = self.link
        if link is None:
            raise NotNow("closed")
        await _stomp_aio.publish(link, self.send_headers(Outgoing(destination, payload, message_id)), payload)

    def ensure_queue(self, name: str) -> None:
        """Make a RabbitMQ queue exist before a delay queue dead-letters into it.

        A SUBSCRIBE declares it; the subscription lives on a throw-away connection so that
        whatever it was sent goes back to the queue when that connection closes.
        """
        if name in self.declared:
            return
        link = self.new_link()
        try:
            rid = link.next_id()
            link.send_frame("SUBSCRIBE", {"destination": f"/queue/{name}", "id": "declare", "ack": "client-individual",
                                          "prefetch-count": "1", "receipt": rid, **self.queue_headers(name)})
            link.wait_receipts([rid])
        finally:
            self.drop(link)
        self.declared.add(name)

    # -- request/reply ---------------------------------------------------------------------
    def reply_path(self, name: str) -> ReplyPath:
        return StompReplyPath(self, name)

    def send_reply(
        self, address: str, payload: bytes, *, message_id: str, ttl: float | None, correlation_id: str | None = None
    ) -> None:
        # a broker's reply destination (/reply-queue/..., /remote-temp-queue/...) as the request
        # frame gave it, or a queue name from a hand-written client's envelope
        raw = address.startswith("/")
        h = self.send_headers(Outgoing(Queue("x") if raw else Queue(address), payload, message_id, None, None, ttl))
        # transient: no "persistent" header at all (on RabbitMQ "persistent:false" also declares a
        # named queue exclusive and auto-delete: ERROR resource_locked for a queue that exists)
        del h["persistent"]
        if raw:
            h = {k: v for k, v in h.items() if not k.startswith("x-")}
            h["destination"] = address
        if correlation_id:
            h["correlation-id"] = correlation_id
        # no receipt, not waited for (as AMQP's replies): a reply lives only as long as its caller
        # waits, and a lost one is that caller's Timeout; the receipt cost the service a broker
        # round trip and two thread wake-ups per reply (docs/backend-stomp.md, "Request/reply").
        # ActiveMQ answers a reply to a deleted temporary queue (its caller has gone: the reply is
        # late) with an ERROR; the connection stays open, but a Link ends at any ERROR, so the
        # next reply goes out on a new one. A connection of its own: that ERROR must not end the
        # consumers' connection.
        frame = encode_frame("SEND", h, payload)
        link = self._reply_link
        if link is None or not link.alive or link.error is not None:
            link = self._new_reply_link(link)
        try:
            link.write(frame)
        except ConnectionLost:
            if not link.alive:
                raise
            self._new_reply_link(link).write(frame)  # an ERROR came after the check: nothing was written

    def _new_reply_link(self, old: Link | None) -> Link:
        if old is not None:
            self.drop(old)
        self._reply_link = None
        link = self._reply_link = self.new_link()
        return link

    # -- consuming -------------------------------------------------------------------------
    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        link = self.main()
        # a connection of its own on a generic broker, and for a RabbitMQ group whose id (its
        # name) this one has in use already (docs/backend-stomp.md, "Connection model")
        own = self.flavour == "generic" or (
            self.flavour == "rabbitmq" and isinstance(destination, Topic) and subscription in link.routes)
        link = self.new_link() if own else link
        try:
            return StompSubscription(self, link, destination, prefetch, subscription, own=own)
        except BaseException:
            if own:
                self.drop(link)
            raise


class StompSubscription(Subscription):
    def __init__(
        self, backend: StompBackend, link: Link, destination: Destination, prefetch: int, subscription: str | None,
        *, own: bool,
    ) -> None:
        self.backend = backend
        self.link = link
        self.own = own  # the link is this subscription's alone (closed with it)
        self.destination = destination
        self.filter: str | None = None
        self.box = Inbox()
        self.unsettled: dict[str, str] = {}  # ack id -> SUBSCRIBE id (RabbitMQ: NACKed on close)
        self.park = backend.flavour == "rabbitmq" and not own
        flavour = backend.flavour
        n = link.next_id("")
        base = {"ack": "client-individual"}
        if flavour == "rabbitmq":
            base["prefetch-count"] = str(prefetch)
        elif flavour == "activemq":
            base["activemq.prefetchSize"] = str(prefetch)
        frames: list[dict[str, str]] = []
        if isinstance(destination, Topic):
            own_queue = subscription or f"{_SUB_PREFIX}{uuid.uuid4().hex[:16]}"
            stomp_dest, self.filter = _topic_destination(destination.name, flavour)
            # ids with a '/' cannot clash with a subscription name (RabbitMQ's durable id)
            t = {**base, "destination": stomp_dest, "id": f"/topic/{n}"}
            if flavour == "rabbitmq":
                t["x-max-priority"] = _MAX_PRIORITY  # the subscription's queue, as for /queue/
            if subscription and flavour == "rabbitmq":
                t.update({"id": subscription, "durable": "true", "auto-delete": "false"})
            elif subscription and flavour == "activemq":
                # the group's queue, which ActiveMQ fills from the virtual topic (a pattern makes a
                # wildcard queue that the broker keeps as one destination, filled while nobody reads)
                t["destination"] = f"/queue/Consumer.{subscription.replace('.', '~')}.{stomp_dest[len('/topic/'):]}"
                t["id"] = f"{_GROUP_ID}/{n}"
            elif subscription:
                raise UnsupportedError(f"durable topic subscriptions are not supported by the {flavour} STOMP broker")
            frames.append(t)
            queue = own_queue
        else:
            queue = destination.name
        frames.append({**base, "destination": f"/queue/{queue}", "id": f"/queue/{n}", **backend.queue_headers(queue)})
        self.retry_target = Queue(queue)
        self.dead_target = Queue(f"{queue}.dead")
        self.ids = [f["id"] for f in frames]
        link.subscribe(frames, self.box)
        backend.declared.add(queue)

    def receive(self, timeout: float | None) -> Delivery | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            frame = self.link.get(left, self.box)
            if frame is None:
                return None
            h = frame.headers
            if self.filter is not None and h.get("subscription") == self.ids[0]:  # the topic's copies
                # a group's copy names its topic in original-destination (ActiveMQ virtual topics)
                topic = h.get("original-destination") or h.get("destination", "")
                topic = topic.removeprefix("/topic/").removeprefix(_VT)
                if not matches(self.filter, topic):
                    self.link.ack(h["ack"])  # this subscription's own copy, outside the exact pattern
                    continue
            if self.park:
                self.unsettled[h["ack"]] = h["subscription"]
            return Delivery(frame.body, frame, broker_redelivered=h.get("redelivered") == "true",
                            reply_to=h.get("reply-to"), correlation_id=h.get("correlation-id"))

    def ack(self, delivery: Delivery) -> None:
        ack_id = delivery.tag.headers["ack"]
        self.link.ack(ack_id)
        if self.park:
            self.unsettled.pop(ack_id, None)

    def requeue(self, delivery: Delivery) -> None:
        frame = delivery.tag
        if self.backend.flavour == "rabbitmq":
            self.link.send_frame("NACK", {"id": frame.headers["ack"]})  # RabbitMQ requeues a NACK
            self.unsettled.pop(frame.headers["ack"], None)
            return
        # elsewhere NACK may mean "dead letter" (ActiveMQ): put a copy back, then ACK
        out = Outgoing(self.retry_target, frame.body, "requeue")
        keep = {k: v for k, v in frame.headers.items() if k in ("priority", "expires")}
        link = self.backend.main()
        headers = {**self.backend.send_headers(out), **keep, "receipt": link.next_id()}
        link.send_frame("SEND", headers, frame.body)
        link.wait_receipts([headers["receipt"]])
        self.ack(delivery)

    def close(self) -> None:
        if self.own:
            self.backend.drop(self.link)  # DISCONNECT: the broker gives every unacked message back
            return
        self.link.unsubscribe(self.ids, self.box, self.unsettled, self.park)


def _topic_destination(pattern: str, flavour: str) -> tuple[str, str | None]:
    """The STOMP destination for a topic pattern and, if it is wider, the exact pattern to filter by."""
    words = pattern.split(".")
    vt = _VT if flavour == "activemq" else ""
    if flavour == "rabbitmq" or not any(w in ("*", "#") for w in words):
        return f"/topic/{vt}{pattern}", None
    if flavour != "activemq":
        raise UnsupportedError(f"topic patterns are not supported by the {flavour} STOMP broker")
    if "#" not in words[:-1]:
        return f"/topic/{vt}" + ".".join(">" if w == "#" else w for w in words), None
    # '#' before the last word has no ActiveMQ equivalent: subscribe wider, filter exactly
    head = words[: words.index("#")]
    return f"/topic/{vt}" + ".".join([*head, ">"]), pattern


__all__ = ["CAPABILITIES", "CAPABILITIES_ACTIVEMQ", "CAPABILITIES_RABBITMQ", "CAPABILITY_ROWS", "StompBackend",
           "StompAuthError", "StompBrokerError"]
