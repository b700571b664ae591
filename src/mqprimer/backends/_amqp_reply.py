"""RabbitMQ direct reply-to for :mod:`mqprimer.backends.amqp` (docs/request-reply.md).

The reply path consumes the pseudo-queue ``amq.rabbitmq.reply-to`` (no-ack, as RabbitMQ
requires) on a channel of its own connection, and publishes its requests on that same
channel with ``reply_to: amq.rabbitmq.reply-to`` (RabbitMQ only accepts that on the
consuming channel). No queue is declared, so none can be left behind: the path ends with
its channel.

The envelope must carry the address too (``mqreplyto``), so that any client can answer
through the envelope alone; RabbitMQ only reveals the channel's address in the
``reply_to`` property of a message it rewrites. So the path learns it once: it publishes a
probe to a server-named exclusive queue of its own and reads the rewritten property back.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pika.exceptions as px
from pika.spec import BasicProperties

from ..backend import Queue, ReplyPath
from ..envelope import CONTENT_TYPE
from ._amqp_link import Link

DIRECT = "amq.rabbitmq.reply-to"


class DirectReplyPath(ReplyPath):
    publishes_requests = True

    def __init__(self, link: Link, queue_args: dict[str, Any]) -> None:
        self.link = link
        self.queue_args = queue_args
        self.declared: set[str] = set()
        self.buf: deque[bytes] = deque()
        with link.lock:
            ch = self.ch = link.conn.channel()
            ch.basic_consume(DIRECT, self._on_reply, auto_ack=True)
            probe = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
            ch.basic_publish("", probe, b"", BasicProperties(reply_to=DIRECT))
            for _ in range(50):
                _, props, _ = ch.basic_get(probe, auto_ack=True)
                if props is not None:
                    break
                link.conn.process_data_events(0.01)
            else:
                raise px.AMQPChannelError("RabbitMQ did not return the direct reply-to probe")
            ch.queue_delete(probe)
            address = props.reply_to
            if not isinstance(address, str) or not address.startswith(DIRECT + "."):
                raise px.AMQPChannelError("RabbitMQ did not rewrite reply_to: no direct reply-to support")
            self.address = address

    def _on_reply(self, _ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        self.buf.append(body)

    def request(self, destination: Queue, payload: bytes, *, message_id: str, ttl: float | None) -> None:
        link = self.link
        with link.lock:
            if link.error is not None:
                raise link.error
            name = destination.name
            if name not in self.declared:  # like send(): the request waits for its service
                self.ch.queue_declare(name, durable=True, arguments=self.queue_args)
                self.declared.add(name)
            props = BasicProperties(
                content_type=CONTENT_TYPE, delivery_mode=2, message_id=message_id, correlation_id=message_id,
                reply_to=DIRECT, expiration=str(max(1, int(ttl * 1000))) if ttl else None,
            )
            # no publisher confirm: the reply confirms the request, and a lost one is a Timeout
            self.ch.basic_publish("", name, payload, props)

    def receive(self, timeout: float) -> bytes | None:
        link, buf = self.link, self.buf
        with link.lock:
            if link.error is not None:
                raise link.error
            if not buf:
                link.conn.process_data_events(time_limit=timeout)
            return buf.popleft() if buf else None

    def close(self) -> None:
        with self.link.lock:
            if self.link.error is None and self.ch.is_open:
                self.ch.close()
