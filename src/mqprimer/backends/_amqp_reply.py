"""RabbitMQ direct reply-to, the AMQP reply path of ``conn.request()`` (docs/request-reply.md).

The reply path consumes the pseudo-queue ``amq.rabbitmq.reply-to`` (no-ack, as RabbitMQ
requires) and publishes its requests on that same channel with ``reply_to:
amq.rabbitmq.reply-to`` (RabbitMQ only accepts that on the consuming channel). No queue is
declared, so none can be left behind: the path ends with its channel. The envelope must
carry the address too (``mqreplyto``), so that any client can answer through the envelope
alone; RabbitMQ only reveals the channel's address in the ``reply_to`` property of a
message it rewrites. So the path learns it once: it publishes a probe to a server-named
exclusive queue of its own and reads the rewritten property back.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

import pika.exceptions as px
from pika.spec import BasicProperties

from ..backend import Queue, ReplyPath
from ..envelope import CONTENT_TYPE
from ._amqp_link import Chan, Link
from ._amqp_out import publish_frames

DIRECT = "amq.rabbitmq.reply-to"


class DirectReplyPath(ReplyPath):
    publishes_requests = True
    # request() only hands a publish to the I/O thread: callers need not wait for the reader
    concurrent_requests = True

    def __init__(self, link: Link, queue_args: dict[str, Any]) -> None:
        self.link = link
        self.queue_args = queue_args
        self.declared: set[str] = set()
        self.buf: SimpleQueue[bytes | None] = SimpleQueue()
        # requests sent and replies read, to tell a lone caller (who writes its request itself)
        # from many in flight (whose requests the I/O thread sends together, in one send());
        # replies are counted on the I/O thread only; a reply that never comes is written off
        # when a read finds nothing (``settled``)
        self.count_lock = threading.Lock()
        self.sent = 0
        self.replies = 0
        self.settled = 0
        self.queued: deque[None] = deque()  # requests handed to the I/O thread, not yet in pika's buffer
        self.error: BaseException | None = None
        self.chan = chan = Chan(link, self._ended)
        probe: list[str] = []

        def consume(ch: Any, done: Callable[[Any], None]) -> None:
            ch.basic_consume(DIRECT, self._on_reply, auto_ack=True, callback=done)

        def declare(ch: Any, done: Callable[[Any], None]) -> None:
            def ok(frame: Any) -> None:
                probe.append(frame.method.queue)
                done(None)

            ch.queue_declare("", exclusive=True, auto_delete=True, callback=ok)

        def learn(ch: Any, done: Callable[[Any], None]) -> None:
            def got(_ch: Any, _method: Any, props: Any, _body: bytes) -> None:
                ch.queue_delete(probe[0])
                done(props.reply_to)

            ch.basic_consume(probe[0], got, auto_ack=True)
            ch.basic_publish("", probe[0], b"", BasicProperties(reply_to=DIRECT))

        address = chan.run(chan.open_step, consume, declare, learn, timeout=10.0)
        if not isinstance(address, str) or not address.startswith(DIRECT + "."):
            chan.close()
            raise px.AMQPChannelError("RabbitMQ did not rewrite reply_to: no direct reply-to support")
        self.address = address

    def _on_reply(self, _ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        self.replies += 1
        self.buf.put(body)

    def _in_flight(self) -> int:
        """Requests sent before this one and not answered (counts this one as sent)."""
        with self.count_lock:
            before = self.sent
            self.sent = before + 1
        return before - self.replies - self.settled

    def _ended(self, reason: BaseException) -> None:
        if isinstance(reason, px.AMQPChannelError):  # the path is gone: the portable layer makes a new one
            reason = px.ChannelWrongStateError(f"the reply channel closed: {reason}")
        self.error = reason
        self.buf.put(None)

    def request(self, destination: Queue, payload: bytes, *, message_id: str, ttl: float | None) -> None:
        if self.error is not None:
            raise self.error
        name = destination.name
        declare = name not in self.declared  # like send(): the request waits for its service
        self.declared.add(name)
        # transient: the reply address lives only as long as this channel, so a request kept on
        # disk over a broker restart could never be answered; persisting it cost each round trip
        # the broker's disk path (about half of it here)
        props = BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=1, message_id=message_id, correlation_id=message_id,
            reply_to=DIRECT, expiration=str(max(1, int(ttl * 1000))) if ttl else None,
        )
        chan, args, link, queued = self.chan, self.queue_args, self.link, self.queued
        if self._in_flight() <= 0 and not declare:
            # from this thread if the socket is idle (_amqp_out): no wake-up of the I/O thread
            def frames() -> bytes | None:
                ch = chan.ch
                if queued or chan.closed is not None or not ch.is_open:
                    return None  # a request handed off before this one (its declare) goes first
                return publish_frames(ch.channel_number, "", name, payload, props, link.conn._body_max_length)

            if link.out.direct(frames):
                return

        # no publisher confirm: the reply confirms the request, and a lost one is a Timeout
        def send() -> None:
            if chan.ch.is_open:
                if declare:
                    chan.ch.queue_declare(name, durable=True, arguments=args)
                chan.ch.basic_publish("", name, payload, props)

        link.submit_ordered(queued, send)

    def receive(self, timeout: float) -> bytes | None:
        if self.error is not None:
            raise self.error
        try:
            payload = self.link.reader.get(self.buf, timeout) if timeout > 0 else self.buf.get_nowait()
        except Empty:
            if timeout > 0:  # a whole wait without a reply: what is still unanswered may never be
                self.settled = self.sent - self.replies
            return None
        if payload is None:
            self.buf.put(None)
            assert self.error is not None
            raise self.error
        return payload

    def close(self) -> None:
        self.chan.close()
