"""Consumer: receives from one destination on every endpoint of a connection.

It decodes envelopes (dead-lettering what is not one), drops expired messages, counts
attempts, performs emulated retry and dead letters (publish the new copy, confirmed,
then ack the original), and resubscribes after a lost connection.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, Protocol

from . import _groups
from ._endpoint import Endpoint
from ._ids import stamp
from ._sub import _Sub
from .backend import NATIVE, Capabilities, Delivery, Destination, Queue, Subscription, Topic
from .destinations import is_pattern
from .envelope import UNSET, Envelope, _decoder, decode, encode, make, replace, validate
from .errors import ConnectionFailed, EnvelopeError, MessageTooLarge, StateError, UnsupportedError
from .message import Message, _State
from .retry import RetryPolicy

log = logging.getLogger("mqprimer")


_PENDING = _State.PENDING
_ACKED = _State.ACKED
_RETURNED = _State.RETURNED


class _Received(Message):
    """A :class:`Message` made by the receive fast path: ``_Received()`` is object's own new
    and init (the class's ``__init__`` is ``object.__init__``), ~0.3k instructions cheaper
    than ``object.__new__(Message)``, which goes through a builtin called with an argument
    tuple; the fast path then stores the slots itself.

    Not listed in its consumer's ``_pending`` (a set add on receive and a discard on ack cost
    ~0.6k instructions a message): ``Consumer.close`` marks the listed messages it finds
    RETURNED, and one of these, pending when its consumer closed, finds that out itself the
    next time it is looked at (``_current``; ``ack`` checks the consumer first), with the
    same state, errors and words.
    """

    __slots__ = ()
    __init__ = object.__init__  # type: ignore[assignment]

    def _current(self) -> _State:
        if self._state is _PENDING and self._consumer._closed:  # type: ignore[attr-defined]  # a Consumer
            self._state = _RETURNED  # given back with its consumer, as close() marks the listed ones
        return self._state

    def ack(self) -> None:
        """Done: remove the message for good."""
        # Message.ack, less the _pending discard (not listed), plus the closed consumer's check
        if self._state is not _PENDING or self._consumer._closed:  # type: ignore[attr-defined]
            self._begin(_ACKED)  # raises StateError: settled, or returned with its consumer
        self._state = _ACKED
        s = self._sub
        sub = s.sub
        ack = None if sub is None else sub.lockfree_ack
        if ack is not None and self._generation == s.generation:
            try:
                ack(self._delivery)  # Subscription.lockfree_ack: see Message.ack
            except KeyError:
                pass
            else:
                return
        self._consumer._settle_ack(self)
# the decoder's bound method, taken once: for a name bound by an import, Python 3.11 compiles
# `_decoder.decode(...)` as a module attribute read, which cannot specialise on a Decoder and
# made (and freed) a bound method object per received message
_decode = _decoder.decode
ERROR_TYPE = "mqprimer.error"  # the type of a dead-lettered request's error reply (docs/request-reply.md)
REPLY_TYPE = "mqprimer.reply"  # the default type of a reply
_SLICE = 0.25  # longest a blocking receive holds a subscription, so close() is prompt


class Owner(Protocol):
    """What a consumer uses of its :class:`~mqprimer.Connection` (which imports this module)."""

    max_message_size: int
    reconnect_timeout: float
    source: str

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def endpoints(self) -> Sequence[Endpoint]: ...

    def _detach(self, child: object) -> None: ...


class Consumer:
    """Receives messages; iterate it, or call :meth:`receive`. Close it (or use ``with``)."""

    def __init__(
        self,
        conn: Owner,
        destination: Destination,
        prefetch: int,
        subscription: str | None,
        retry_policy: RetryPolicy,
    ) -> None:
        self._conn = conn
        self.destination = destination
        self.prefetch = prefetch
        self.subscription = subscription
        self.retry_policy = retry_policy
        self._closed = False
        self._pending: set[Message] = set()
        self._rr = 0
        caps = conn.capabilities
        if isinstance(destination, Topic):
            caps.require("topic", "publish-subscribe (Topic destinations)")
            if is_pattern(destination):
                caps.require("patterns", "wildcard topic patterns ('*', '#')")
        else:
            caps.require("queue", "queues (point-to-point destinations); use a Topic")
        self._group: _groups.Key | None = None
        if subscription is not None and isinstance(destination, Topic):
            hosts = tuple(ep.url.render(hide_password=True) for ep in conn.endpoints)
            self._group = _groups.claim(caps, hosts, destination, subscription)
        try:
            self._subscribe_all(conn, destination)
        except BaseException:
            _groups.release(self._group)
            raise

    def _subscribe_all(self, conn: Owner, destination: Destination) -> None:
        self._subs: list[_Sub] = [_Sub(ep, destination) for ep in conn.endpoints]
        self._single = self._subs[0] if len(self._subs) == 1 else None
        errors: list[ConnectionFailed] = []
        for s in self._subs:
            try:
                self._subscribe(s)
            except ConnectionFailed as exc:
                errors.append(exc)
                s.down_since = s.next_try = time.monotonic()
        if len(errors) == len(self._subs):
            raise errors[0]

    # -- receiving ------------------------------------------------------------------
    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, or ``None`` after ``timeout`` seconds (``None`` waits for ever)."""
        if self._closed:
            raise StateError("the consumer is closed")
        s = self._single
        if s is not None:
            # fast path: one live subscription and a message already waiting (_receive_from
            # inline: one Python frame less per message). The generation before the
            # subscription: a resubscribe between the two reads leaves the message an older
            # generation, whose settle then refuses (LOST), never a newer one.
            gen = s.generation
            sub = s.sub
            if sub is not None and sub.lockfree_receive:
                # without the lock, where the driver's poll needs none (Subscription.lockfree_receive),
                # as one straight line: ~0.2k instructions a message less than sharing the locked code
                try:
                    delivery = sub.receive(0.0)
                except Exception as exc:
                    self._fail_unlocked(s, sub, exc)
                    delivery = None
                if delivery is not None:
                    # _wrap's common case inline: a plain envelope (the schema's decoder
                    # alone, as in _wrap), no expiry, first delivery
                    try:
                        env: Envelope | None = _decode(delivery.payload)
                    except Exception:
                        env = None
                    if (env is None or env.headers_json is not None or env.data_base64 is not UNSET
                            or env.expires is not None or delivery.extra_attempts):
                        msg = self._wrap_unlocked(s, sub, delivery, env)
                        if msg is not None:
                            return msg
                    else:
                        m: Message = _Received()  # Message.__init__'s stores, without its call
                        m._consumer = self
                        m._sub = s
                        m._delivery = delivery
                        m._generation = gen
                        m.envelope = env
                        m._state = _PENDING
                        m._replied = False
                        return m
                if timeout == 0:
                    return None
            elif sub is not None:
                # the same under the subscription's lock, for every other driver
                msg = None
                lock = s.lock
                lock.acquire()  # not `with`: its special-method lookups cost more than the lock
                try:
                    gen = s.generation  # again under the lock, and before the subscription
                    sub = s.sub
                    if sub is not None:
                        try:
                            delivery = sub.receive(0.0)
                        except Exception as exc:
                            self._fail(s, exc, "receive")
                            delivery = None
                        if delivery is not None:
                            try:
                                env = _decode(delivery.payload)
                            except Exception:
                                env = None
                            if (env is None or env.headers_json is not None or env.data_base64 is not UNSET
                                    or env.expires is not None or delivery.extra_attempts):
                                msg = self._wrap(s, sub, delivery, env)
                            else:
                                msg = _Received()
                                msg._consumer = self
                                msg._sub = s
                                msg._delivery = delivery
                                msg._generation = gen
                                msg.envelope = env
                                msg._state = _PENDING
                                msg._replied = False
                finally:
                    lock.release()
                if msg is not None or timeout == 0:
                    return msg
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            now = time.monotonic()
            self._revive(now)
            live = [s for s in self._subs if s.sub is not None]
            remaining = _SLICE if deadline is None else max(deadline - now, 0.0)
            if not live:
                self._check_down(now)
                nxt = min(s.next_try for s in self._subs)
                time.sleep(max(0.0, min(nxt - now, remaining, _SLICE)))
            else:
                self._rr = (self._rr + 1) % len(live)
                order = live[self._rr:] + live[: self._rr]
                if len(live) > 1:
                    # several brokers (high availability): poll every one without waiting
                    # first, so an idle broker never holds up messages waiting on another;
                    # then wait briefly on one of them, in turn
                    for s in order:
                        msg = self._receive_from(s, 0.0)
                        if msg is not None:
                            return msg
                    wait = min(remaining, 0.02)
                else:
                    wait = min(remaining, _SLICE)
                if wait > 0 or len(live) == 1:
                    msg = self._receive_from(order[0], wait)
                    if msg is not None:
                        return msg
            if deadline is not None and time.monotonic() >= deadline:
                return None
        return None

    def __iter__(self) -> Iterator[Message]:
        while not self._closed:
            try:
                msg = self.receive(timeout=_SLICE)
            except StateError:
                return
            if msg is not None:
                yield msg

    def _receive_from(self, s: _Sub, timeout: float) -> Message | None:
        with s.lock:
            sub = s.sub
            if sub is None:
                return None
            try:
                delivery = sub.receive(timeout)
            except Exception as exc:
                self._fail(s, exc, "receive")
                return None
            if delivery is None:
                return None
            return self._wrap(s, sub, delivery)

    def _wrap_unlocked(self, s: _Sub, sub: Subscription, d: Delivery, decoded: Envelope | None) -> Message | None:
        """``_wrap`` (which may settle on the driver) for a delivery polled without the lock."""
        with s.lock:
            if s.sub is not sub:
                return None  # closed or lost meanwhile, which gave the delivery back
            return self._wrap(s, sub, d, decoded)

    def _fail_unlocked(self, s: _Sub, sub: Subscription, exc: Exception) -> None:
        with s.lock:
            if s.sub is sub:
                self._fail(s, exc, "receive")

    def _wrap(self, s: _Sub, sub: Subscription, d: Delivery, decoded: Envelope | None = None) -> Message | None:
        """The message of delivery ``d``; ``decoded``: its payload already through ``_decoder``."""
        try:
            # the schema's decoder alone: decode() below adds only the size check (moot here,
            # the limit being at least the payload's length) and the words of its error
            env: Envelope = _decode(d.payload) if decoded is None else decoded
            if env.headers_json is not None or env.data_base64 is not UNSET:
                validate(env)  # the envelope's rules the schema cannot state (envelope.validate)
        except Exception:
            try:
                env = decode(d.payload, max(self._conn.max_message_size, len(d.payload) if d.payload else 0))
            except EnvelopeError as exc:
                self._dead_raw(s, sub, d, f"invalid envelope: {exc}")
                return None
        if env.expires is not None and env.expires <= time.time() * 1000:
            log.info("message %s expired before delivery; dropped", env.id)
            self._call(s, "ack", lambda: sub.ack(d))
            return None
        if d.extra_attempts:
            env.attempt += d.extra_attempts
        msg = Message(self, s, d, env, s.generation)
        self._pending.add(msg)
        return msg

    # -- settling -------------------------------------------------------------------
    def _settle_retry(self, m: Message, delay: float, error: str | None) -> None:
        caps = m._sub.ep.capabilities
        if not caps.retry:
            _refuse(m, f"the {caps.name} backend does not support retry; message {m.id} is still unsettled: "
                    "ack or dead-letter it (with Message.fail, use RetryPolicy(max_attempts=1))")
        if delay and not caps.delay:
            _refuse(m, f"the {caps.name} backend cannot delay a retry; use retry() without a delay")
        env = replace(m.envelope, attempt=m.attempt + 1, error=error or m.envelope.error)
        payload = encode(env, max_size=1 << 62, original=m._delivery.payload)
        if caps.retry is NATIVE:
            self._settle(m, "retry", lambda sub: sub.retry(m._delivery, payload, delay))
        else:
            self._settle(
                m, "retry", lambda sub: self._republish(m._sub, sub.retry_target, payload, env.id, delay, m._delivery)
            )

    def _settle_dead(self, m: Message, reason: str) -> None:
        caps = m._sub.ep.capabilities
        if not caps.dead_letter:
            _refuse(m, f"the {caps.name} backend does not support dead letters; message {m.id} is still "
                    "unsettled: ack it, or retry it where retry is supported")
        env = replace(m.envelope, reason=reason[:2000], origin=_name(m.destination))
        if m.reply_to is not None and not m._replied:
            # the caller gets an answer (RemoteError) instead of waiting for its timeout; sent
            # before the settle, which on gearman carries it (a foreground job's WORK_COMPLETE)
            try:
                m._begin_reply()
                self._reply(m, {"error": reason[:2000]}, None, ERROR_TYPE, reason[:2000])
            except Exception as exc:
                log.warning("error reply to request %s not sent: %s", m.id, exc)
        self._settle(m, "dead-letter", lambda sub: self._bury(m._sub, sub, m._delivery, env))

    def _reply(self, m: Message, body: Any, headers: dict[str, str] | None, type: str | None,
               error: str | None) -> None:
        """Send the reply to request ``m`` (``Message.reply`` checked that it is one)."""
        req = m.envelope
        address = m.reply_to
        assert address is not None
        try:
            m._sub.ep.capabilities.require("request_reply", "request/reply (message.reply)")
            if headers:
                for k, v in headers.items():
                    if not isinstance(k, str) or not isinstance(v, str):
                        raise TypeError("headers must map str to str")
            if type is not None and (not isinstance(type, str) or not type):
                raise ValueError(f"type must be a non-empty string, got {type!r}")
            mid, now = stamp()
            # the reply lives as long as its request: a late one expires instead of piling up
            env = make(id=mid, source=self._conn.source, type=type or REPLY_TYPE, body=body, time=now,
                       headers=headers, expires=req.expires, reason=error, correlation_id=req.correlation_id or req.id)
            payload = encode(env, max_size=self._conn.max_message_size)
            ttl = None
            if req.expires is not None:
                ttl = max((req.expires - time.time() * 1000) / 1000, 0.001)
            ep = m._sub.ep
            native_ttl = ttl if ep.capabilities.ttl is NATIVE else None
            native = m._delivery.correlation_id
            if native is None:
                ep.call("reply", lambda b: b.send_reply(address, payload, message_id=mid, ttl=native_ttl))
            else:  # the driver delivered the protocol's own correlation id: it takes one back (backend.py)
                def send(b: Any) -> None:
                    b.send_reply(address, payload, message_id=mid, ttl=native_ttl, correlation_id=native)

                ep.call("reply", send)
        except BaseException:
            m._replied = False
            raise

    def _touch(self, m: Message) -> None:
        # on failure the lease is gone: the message is no longer ours to settle (LOST)
        self._settle(m, "touch", lambda sub: sub.touch(m._delivery), settles=False)

    @property
    def delivery_lease(self) -> float | None:
        """Seconds a received message stays this consumer's before the broker may give it to
        another unless settled or :meth:`Message.touch`-ed; ``None``: until settled or closed."""
        leases = [s.sub.delivery_lease for s in self._subs if s.sub is not None and s.sub.delivery_lease]
        return min(leases) if leases else None

    def _settle(self, m: Message, what: str = "ack", fn: Callable[[Subscription], None] | None = None,
                settles: bool = True) -> None:
        """Run ``fn`` (``None``: ack) on the subscription ``m`` arrived on; ``settles``: ``m`` is done after it."""
        s = m._sub
        lock = s.lock
        lock.acquire()  # not `with` (see receive)
        try:
            if s.sub is None or m._generation != s.generation:
                m._mark(_State.LOST)
                self._pending.discard(m)
                raise ConnectionFailed(
                    f"cannot {what} message {m.id}: the connection it arrived on was lost; "
                    "the broker will deliver it again"
                )
            sub = s.sub
            try:
                if fn is None:
                    sub.ack(m._delivery)
                else:
                    fn(sub)
            except (UnsupportedError, MessageTooLarge):
                m._mark(_State.PENDING)
                raise
            except Exception as exc:
                m._mark(_State.LOST)
                self._pending.discard(m)
                self._fail(s, exc, what, reraise=True)
        finally:
            lock.release()
        if settles:
            self._pending.discard(m)

    # Message.ack's call: _settle itself, its defaults an ack without a closure per message
    # (a forwarding method was one more Python frame per message)
    _settle_ack = _settle

    def _republish(self, s: _Sub, target: Destination, payload: bytes, mid: str, delay: float, d: Delivery) -> None:
        s.ep.call("republish", lambda b: b.publish(target, payload, message_id=mid, delay=delay or None))
        assert s.sub is not None
        s.sub.ack(d)

    def _bury(self, s: _Sub, sub: Subscription, d: Delivery, env: Envelope) -> None:
        caps = s.ep.capabilities
        payload = encode(env, max_size=1 << 62, original=d.payload if env.type != "mqprimer.invalid" else None)
        if caps.dead_letter is NATIVE:
            sub.dead_letter(d, payload, env.reason or "")
        elif caps.dead_letter:
            self._republish(s, sub.dead_target, payload, env.id, 0.0, d)
        else:  # callers check first; never drop a message for want of a dead-letter queue
            raise UnsupportedError(f"the {caps.name} backend does not support dead letters")

    def _dead_raw(self, s: _Sub, sub: Subscription, d: Delivery, reason: str) -> None:
        """Dead-letter a payload that is not an envelope, wrapped so that it can be inspected."""
        caps = s.ep.capabilities
        if not caps.dead_letter:
            # nowhere to put it, and dropping it would lose it: it stays unsettled (the broker
            # has it back when this consumer closes) and this consumer goes on
            log.warning(
                "a message on %s is not an mqprimer envelope (%s) and the %s backend has no dead letters: "
                "left unsettled, it goes back to the broker when this consumer closes",
                _name(self.destination), reason, caps.name,
            )
            return
        log.warning("dead-lettering a message on %s: %s", _name(self.destination), reason)
        env = make(
            id=str(uuid.uuid4()), source=self._conn.source, type="mqprimer.invalid",
            body=bytes(d.payload[: self._conn.max_message_size // 2]), reason=reason, origin=_name(self.destination),
        )
        self._call(s, "dead-letter", lambda: self._bury(s, sub, d, env))

    def _call(self, s: _Sub, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            self._fail(s, exc, what)

    # -- connection loss ------------------------------------------------------------
    def _subscribe(self, s: _Sub) -> None:
        with s.lock:
            s.sub, s.made_on = s.ep.call(
                "subscribe",
                lambda b: (b.subscribe(self.destination, prefetch=self.prefetch, subscription=self.subscription),
                           s.ep.generation),
            )
            s.generation += 1
            s.backoff = 0.05
            s.down_since = None

    def _fail(self, s: _Sub, exc: BaseException, what: str, reraise: bool = False) -> None:
        err = s.ep.translate(exc, what)
        if not isinstance(err, ConnectionFailed):
            raise err from None
        log.warning("%s on %s lost: %s; reconnecting", what, s.ep.url, err)
        sub, s.sub = s.sub, None
        if sub is not None:
            try:
                sub.close()
            except Exception:
                pass
        if s.made_on == s.ep.generation:
            # only the backend this subscription lived on: a newer one carries the consumers that
            # resubscribed already (they share its connection), resetting it would drop them again
            s.ep.reset()
        now = time.monotonic()
        s.down_since = s.down_since or now
        s.next_try = now
        if reraise:
            raise err from None

    def _revive(self, now: float) -> None:
        for s in self._subs:
            if s.sub is None and now >= s.next_try:
                try:
                    self._subscribe(s)
                    log.info("resubscribed to %s on %s", _name(self.destination), s.ep.url)
                except ConnectionFailed:
                    s.next_try = now + s.backoff
                    s.backoff = min(s.backoff * 2, 2.0)

    def _check_down(self, now: float) -> None:
        since = min((s.down_since or now) for s in self._subs)
        if now - since > self._conn.reconnect_timeout:
            raise ConnectionFailed(
                f"no broker reachable for {self._conn.reconnect_timeout:.0f}s while consuming "
                f"{_name(self.destination)} from {', '.join(str(s.ep.url) for s in self._subs)}"
            )

    # -- closing --------------------------------------------------------------------
    def close(self) -> None:
        """Stop; every unsettled message goes back to the broker."""
        if self._closed:
            return
        self._closed = True
        for m in list(self._pending):
            m._mark(_State.RETURNED)
        self._pending.clear()
        for s in self._subs:
            with s.lock:
                sub, s.sub = s.sub, None
                if sub is not None:
                    try:
                        sub.close()
                    except Exception as exc:
                        log.debug("closing subscription on %s: %s", s.ep.url, s.ep.scrub(str(exc)))
        _groups.release(self._group)
        self._conn._detach(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refuse(m: Message, why: str) -> NoReturn:
    """Refuse an outcome before anything is done: the message stays unsettled, nothing is lost."""
    m._mark(_State.PENDING)
    raise UnsupportedError(why)


def _name(dest: Destination) -> str:
    return dest.name if isinstance(dest, (Queue, Topic)) else str(dest)
