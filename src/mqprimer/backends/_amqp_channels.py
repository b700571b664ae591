"""The kinds of channel :mod:`mqprimer.backends.amqp` opens on its connection (a
:class:`~._amqp_link.Link`): the publisher-confirm channel and a consumer's channel
(RabbitMQ direct reply-to: ``_amqp_reply``).
"""

from __future__ import annotations

import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any

import pika.exceptions as px
from pika.adapters.blocking_connection import ReturnedMessage
from pika.spec import Basic, BasicProperties

from .._ids import prepare
from ..backend import Delivery, Destination, Queue, Subscription, Topic
from ._amqp_link import _CLOSE_WAIT, Chan, Link, Step, Waiter, refused
from ._amqp_out import ack_frame


@dataclass(frozen=True)
class SubQueue(Queue):
    """A subscription's own queue: exists already (maybe exclusive to another connection)."""


class Confirmer(Chan):
    """A channel in confirm mode that pipelines: publish a batch, then wait for every confirm.

    The batch (and the nowait declarations it needs, which the broker applies first) goes
    out in one hand-off to the I/O thread; the confirms are counted there as they arrive
    and the caller is woken when the last one is in.
    """

    def __init__(self, link: Link) -> None:
        super().__init__(link)
        self._outstanding: OrderedDict[int, int] = OrderedDict()  # delivery tag -> index in batch
        self._nacked: list[int] = []
        self.returned: list[ReturnedMessage] = []  # mandatory messages the broker could not route
        self._seq = 0
        self._batch: Waiter | None = None

        def select(ch: Any, done: Callable[[Any], None]) -> None:
            ch.add_on_return_callback(self._on_return)
            ch.confirm_delivery(ack_nack_callback=self._on_confirm, callback=done)

        self.run(self.open_step, select)

    # -- I/O thread ----------------------------------------------------------------------
    def _on_return(self, _channel: Any, method: Any, props: BasicProperties, body: bytes) -> None:
        self.returned.append(ReturnedMessage(method, props, body))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nack = isinstance(method, Basic.Nack)
        out = self._outstanding
        if method.multiple:
            while out:
                tag = next(iter(out))
                if tag > method.delivery_tag:
                    break
                idx = out.pop(tag)
                if nack:
                    self._nacked.append(idx)
        else:
            idx = out.pop(method.delivery_tag, -1)
            if nack and idx >= 0:
                self._nacked.append(idx)
        w = self._batch
        if not out and w is not None:
            self._batch = None
            if self._nacked:
                w.set(error=px.NackError([]))  # the broker refused them (internal error): nothing stored
            elif self.returned:
                w.set(error=px.UnroutableError(self.returned))
            else:
                w.set()

    def closed_hook(self, reason: BaseException) -> None:
        w, self._batch = self._batch, None
        if w is not None:
            w.set(error=refused(reason))

    # -- any thread --------------------------------------------------------------------------
    def publish(self, ops: Sequence[Callable[[Any], None]],
                batch: Sequence[tuple[str, str, bytes, BasicProperties, bool]]) -> None:
        """Run ``ops`` (nowait declarations) on the channel, then publish ``(exchange,
        routing_key, body, properties, mandatory)`` items; return when all are confirmed."""

        def start(w: Waiter) -> None:
            if self.closed is not None:
                w.set(error=refused(self.closed))
                return
            ch = self.ch
            for op in ops:
                op(ch)
            self._nacked.clear()
            self.returned = []
            out = self._outstanding
            publish = ch.basic_publish
            seq = self._seq
            for i, (exchange, key, body, props, mandatory) in enumerate(batch):
                publish(exchange, key, body, props, mandatory)
                seq += 1
                out[seq] = i
            self._seq = seq
            self._batch = w

        self.link.call(start, meanwhile=prepare)  # the next message's id, made while RabbitMQ confirms (see _ids)


def _nowait(fn: Callable[[Any], None]) -> Step:
    def step(ch: Any, done: Callable[[Any], None]) -> None:
        fn(ch)
        done(None)

    return step


class AmqpSubscription(Subscription):
    """A channel of the backend's connection: qos, declarations, one consumer.

    Deliveries reach the consumer thread through a ``SimpleQueue``, one list per read of the
    socket (a burst: one wake-up for many messages, not one each); ``None`` in it means the
    channel ended. The consumer thread takes them out of its own deque."""

    def __init__(self, link: Link, destination: Destination, prefetch: int, name: str | None, exchange: str,
                 args: dict[str, Any]) -> None:
        self.destination = destination
        self._link = link
        self._q: SimpleQueue[list[Delivery] | None] = SimpleQueue()
        self._burst: list[Delivery] = []  # I/O thread: deliveries of the read under way
        self._local: deque[Delivery] = deque()  # consumer thread: handed over, not received yet
        self._error: BaseException | None = None
        # acks are written in batches (see ack); this many may wait for the next one
        self._ack_batch = max(1, prefetch // 4)
        self._acks: deque[int] = deque()
        self._flush_due = False
        self._chan = chan = Chan(link, self._ended)
        steps: list[Step] = [chan.open_step, lambda ch, done: ch.basic_qos(prefetch_count=prefetch, callback=done)]
        if isinstance(destination, Topic):
            qname = name or f"mqprimer.sub.{uuid.uuid4().hex}"
            steps += [
                _nowait(lambda ch: ch.exchange_declare(exchange, "topic", durable=True)),
                _nowait(lambda ch: ch.queue_declare(qname, durable=name is not None, exclusive=name is None,
                                                    auto_delete=name is None, arguments=args)),
                _nowait(lambda ch: ch.queue_bind(qname, exchange, routing_key=destination.name)),
            ]
            self.retry_target: Destination = SubQueue(qname)
        else:
            qname = destination.name
            steps.append(_nowait(lambda ch: ch.queue_declare(qname, durable=True, arguments=args)))
            self.retry_target = destination
        self.dead_target = Queue(f"{qname}.dead")
        self._qname = qname

        def consume(ch: Any, done: Callable[[Any], None]) -> None:
            ch.add_on_cancel_callback(self._cancelled)
            ch.basic_consume(qname, self._on_message, callback=done)
            link.flushers.add(self)

        steps.append(consume)
        try:
            chan.run(*steps)
        except px.AMQPChannelError as exc:  # refused: that channel is closed, the connection is fine
            raise refused(exc) from None
        except BaseException:
            chan.close()
            raise

    # -- I/O thread -----------------------------------------------------------------------
    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        burst = self._burst
        burst.append(Delivery(body, method.delivery_tag, 0, method.redelivered, props.reply_to, props.correlation_id))
        if len(burst) == 1:  # handed over once pika has parsed all it read (timers run after reads)
            self._link.ioloop.call_later(0, self._hand_over)

    def _hand_over(self) -> None:
        burst, self._burst = self._burst, []
        if burst and self._error is None:
            self._q.put(burst)

    def _cancelled(self, _frame: Any) -> None:
        # RabbitMQ cancels the consumer of a deleted queue (consumer_cancel_notify); the
        # channel stays open, the other subscriptions are untouched
        self._ended(px.ConsumerCancelled(f"the broker cancelled the consumer of queue {self._qname!r} "
                                         "(the queue was deleted?); close this consumer and subscribe again"))

    def _ended(self, reason: BaseException) -> None:
        if self._error is None:
            self._error = refused(reason)
            self._link.flushers.discard(self)
            self._q.put(None)  # wakes a waiting receive

    def drain_acks(self) -> None:
        """Write out the acks waiting (I/O thread; the link's timer calls it every 0.2 s)."""
        self._flush_due = False  # first: an ack from now on schedules another drain
        acks, ch = self._acks, self._chan.ch
        if not ch.is_open:
            acks.clear()  # their delivery tags die with the channel
            return
        ack = ch.basic_ack
        try:
            while True:  # a thread writing acks directly (_ack_frames) may take the last one meanwhile
                ack(acks.popleft())
        except IndexError:
            pass

    # -- consumer thread --------------------------------------------------------------------
    def receive(self, timeout: float | None) -> Delivery | None:
        if self._error is not None:  # what is buffered will be redelivered: do not hand it out
            raise self._error
        local, q = self._local, self._q
        if local:
            d = local.popleft()
            # more to do after this one: a reply sent meanwhile goes with the I/O thread's batch
            self._link.backlog = bool(local) or not q.empty()
            return d
        try:
            burst = q.get_nowait()
        except Empty:
            if timeout is not None and timeout <= 0:
                return None
            if self._acks:
                self._flush()
            try:
                burst = self._link.reader.get(q, timeout)
            except Empty:
                return None
        if burst is None:
            q.put(None)
            assert self._error is not None
            raise self._error
        local.extend(burst)
        d = local.popleft()
        self._link.backlog = bool(local) or not q.empty()
        return d

    def _flush(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            self._link.submit(self.drain_acks)

    def ack(self, delivery: Delivery) -> None:
        """Ack. While more prefetched messages wait, the frame leaves with the next batch
        of acks (every ``prefetch / 4``, when the consumer next waits or closes, or within
        0.2 s by the I/O thread's timer); when none waits, at once.

        Batching saves a hand-off and a send() per message on busy queues. A process killed
        inside that window gets the message redelivered: at-least-once either way.
        """
        if self._error is not None:
            raise self._error
        acks = self._acks
        acks.append(delivery.tag)
        if len(acks) >= self._ack_batch or (not self._local and self._q.empty()):
            if not self._link.out.direct(self._ack_frames):  # sent from this thread if the socket is idle
                self._flush()

    def _ack_frames(self) -> bytes | None:
        """The waiting acks' frames (under the output lock, see _amqp_out), or None if the
        channel cannot take them."""
        ch, acks = self._chan.ch, self._acks
        if self._chan.closed is not None or not ch.is_open or not acks:
            return None
        n = ch.channel_number
        frames = []
        try:
            while True:  # the I/O thread's drain_acks may take the last one meanwhile
                frames.append(ack_frame(n, acks.popleft()))
        except IndexError:
            pass
        return b"".join(frames) if frames else None

    def requeue(self, delivery: Delivery) -> None:
        if self._error is not None:
            raise self._error
        chan, tag = self._chan, delivery.tag

        def nack() -> None:
            if chan.ch.is_open:
                chan.ch.basic_nack(tag, requeue=True)

        self._link.submit(nack)

    def close(self) -> None:
        # closing the channel hands every unacked delivery (buffered ones too) back; the
        # acks given before go first
        chan, link = self._chan, self._link

        def last(ch: Any, _done: Callable[[Any], None]) -> None:
            link.flushers.discard(self)
            self.drain_acks()
            ch.close()  # its close callback ends the wait

        if chan.closed is None and link.error is None:
            try:
                chan.run(last, timeout=_CLOSE_WAIT)
            except px.AMQPError:
                pass
