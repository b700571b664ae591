"""STOMP temporary reply queues for :mod:`mqprimer.backends.stomp` (docs/request-reply.md).

A connection's reply path is a STOMP connection of its own that sends every request with
``reply-to: /temp-queue/<name>``. Both brokers make that a temporary queue owned by the
connection and deleted with it, and rewrite the header for the receiver: RabbitMQ to
``/reply-queue/amq.gen-...`` (and subscribes the path to it by itself), ActiveMQ to
``/remote-temp-queue/ID:...`` (the path subscribes to ``/temp-queue/<name>`` first). The
service answers to the header it received (:attr:`Delivery.reply_to`), with the request's
``correlation-id``. The envelope's ``mqreplyto`` is ``/temp-queue/<name>``: on STOMP a
hand-written service answers to the frame's ``reply-to`` header, as STOMP clients do.
"""

from __future__ import annotations

from typing import Protocol

from ..backend import Outgoing, Queue, ReplyPath
from ._stomp_link import Link
from ._stomp_wire import encode_frame

#: requests are sent without ``persistent:true`` (transient on both brokers; False: as before,
#: for bench_rpc_stomp.py's comparison)
TRANSIENT = True


class _Backend(Protocol):
    """What the path uses of :class:`~mqprimer.backends.stomp.StompBackend` (which imports this module)."""

    flavour: str

    def new_link(self, client_id: str | None = None) -> Link: ...

    def drop(self, link: Link) -> None: ...

    def send_headers(self, item: Outgoing) -> dict[str, str]: ...


class StompReplyPath(ReplyPath):
    publishes_requests = True

    def __init__(self, backend: _Backend, name: str) -> None:
        self.backend = backend
        self.address = f"/temp-queue/{name}"
        self.link: Link = backend.new_link()
        if backend.flavour != "rabbitmq":  # RabbitMQ subscribes a temp queue's owner by itself
            rid = self.link.next_id()
            self.link.send_frame("SUBSCRIBE", {"destination": self.address, "id": "mqreply", "ack": "auto",
                                               "receipt": rid})
            self.link.wait_receipts([rid])

    def request(self, destination: Queue, payload: bytes, *, message_id: str, ttl: float | None) -> None:
        h = self.backend.send_headers(Outgoing(destination, payload, message_id, None, None, ttl))
        if TRANSIENT:
            # a request cannot outlive its reply path (the temporary queue dies with this link), so
            # persisting it buys nothing, and costs the broker a disk write per request. The header
            # is left out, never sent as "false": on RabbitMQ "persistent" is also the queue's
            # "durable" declaration argument, and durable:false declares the service's queue
            # exclusive and auto-delete, which the broker refuses (ERROR resource_locked)
            del h["persistent"]
        h["reply-to"] = self.address
        h["correlation-id"] = message_id
        # no receipt: the reply confirms the request; a refused SEND closes this link, and the
        # next receive raises
        self.link.write(encode_frame("SEND", h, payload))

    def receive(self, timeout: float) -> bytes | None:
        frame = self.link.get(timeout)
        return None if frame is None else bytes(frame.body)

    def close(self) -> None:
        self.backend.drop(self.link)  # DISCONNECT: the broker deletes the temporary queue
