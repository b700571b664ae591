"""A received message and its three outcomes: ack, retry, dead_letter."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Protocol

from .errors import StateError

if TYPE_CHECKING:  # pragma: no cover
    from ._sub import _Sub
    from .backend import Delivery, Destination
    from .envelope import Envelope
    from .retry import RetryPolicy


class _Settler(Protocol):
    """What a message asks of the :class:`~mqprimer.Consumer` it came from (which imports this module)."""

    retry_policy: "RetryPolicy"

    def _settle_ack(self, m: "Message") -> None: ...

    def _settle_retry(self, m: "Message", delay: float, error: str | None) -> None: ...

    def _settle_dead(self, m: "Message", reason: str) -> None: ...

    def _touch(self, m: "Message") -> None: ...

    def _reply(self, m: "Message", body: Any, headers: dict[str, str] | None, type: str | None,
               error: str | None) -> None: ...


class _State(enum.Enum):
    PENDING = "pending"
    ACKED = "acked"
    RETRIED = "retried"
    DEAD = "dead-lettered"
    RETURNED = "returned to the broker"
    LOST = "lost with its connection"


# Reading a member off an Enum class goes through EnumType.__getattr__ (Python 3.11), ~30x
# a global's cost: the per-message path uses these
_PENDING = _State.PENDING
_ACKED = _State.ACKED


class Message:
    """One delivery. Settle it exactly once: :meth:`ack`, :meth:`retry` or :meth:`dead_letter`.

    A message not settled when its consumer closes goes back to the broker.
    """

    __slots__ = ("_consumer", "_sub", "_delivery", "_generation", "envelope", "_state", "_replied")

    def __init__(
        self, consumer: _Settler, sub: "_Sub", delivery: "Delivery", envelope: "Envelope", generation: int
    ) -> None:
        self._consumer = consumer
        self._sub = sub
        self._delivery = delivery
        self._generation = generation
        self.envelope = envelope
        self._state = _State.PENDING
        self._replied = False

    # -- content ------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def body(self) -> Any:
        return self.envelope.body

    @property
    def headers(self) -> dict[str, str]:
        return self.envelope.headers

    @property
    def type(self) -> str:
        return self.envelope.type

    @property
    def attempt(self) -> int:
        """1 on the first delivery, +1 for each retry."""
        return self.envelope.attempt

    @property
    def destination(self) -> "Destination":
        return self._sub.destination

    @property
    def time(self) -> str | None:
        return self.envelope.time

    @property
    def source(self) -> str:
        return self.envelope.source

    @property
    def reason(self) -> str | None:
        """Why it was dead-lettered (on messages read from a dead-letter queue)."""
        return self.envelope.reason

    @property
    def error(self) -> str | None:
        """The last handler error recorded by a retry."""
        return self.envelope.error

    @property
    def reply_to(self) -> str | None:
        """Where a request's reply goes (the protocol's reply-to where the broker gave one, else
        ``mqreplyto``); ``None`` for a message that expects none."""
        return self._delivery.reply_to or self.envelope.reply_to

    @property
    def correlation_id(self) -> str | None:
        """On a reply: the id of the request it answers."""
        return self.envelope.correlation_id

    def reply(self, body: Any, *, headers: dict[str, str] | None = None, type: str | None = None) -> None:
        """Answer a request (send ``body`` to its :attr:`reply_to`), once; then settle it as usual.

        Raises :class:`StateError` if the message expects no reply or was answered already.
        """
        self._begin_reply()
        self._consumer._reply(self, body, headers, type, None)

    def _begin_reply(self) -> None:
        if self.reply_to is None:
            raise StateError(f"message {self.id} is not a request (it has no reply_to): there is nobody to reply to")
        if self._replied:
            raise StateError(f"message {self.id} was answered already: a request gets one reply")
        self._replied = True

    @property
    def settled(self) -> bool:
        return self._current() is not _PENDING

    def _current(self) -> _State:
        """The state, as every reader but the per-message ack path takes it (a subclass may
        find it changed since it was stored: the consumer's receive fast path's does)."""
        return self._state

    # -- outcomes -----------------------------------------------------------------
    def ack(self) -> None:
        """Done: remove the message for good."""
        if self._state is not _PENDING:  # _begin, inline: the per-message path
            self._begin(_State.ACKED)
        self._state = _ACKED
        s = self._sub
        sub = s.sub
        ack = None if sub is None else sub.lockfree_ack
        if ack is not None and self._generation == s.generation:
            # the driver's ack is one atomic step of its own bookkeeping (Subscription.lockfree_ack):
            # neither the subscription's lock nor the consumer's _settle frame (~1.6k instructions
            # of a ~19k receive + ack). KeyError: it holds the delivery no more (closed or lost
            # meanwhile); the locked path below finds out which and says so.
            try:
                ack(self._delivery)
            except KeyError:
                pass
            else:
                self._consumer._pending.discard(self)  # type: ignore[attr-defined]  # a Consumer's
                return
        self._consumer._settle_ack(self)

    def retry(self, delay: float | None = None, *, error: str | None = None) -> None:
        """Deliver again (attempt + 1) after ``delay`` seconds; never blocks the consumer."""
        if delay is not None and delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        self._begin(_State.RETRIED)
        self._consumer._settle_retry(self, delay or 0.0, error)

    def dead_letter(self, reason: str) -> None:
        """Move to the dead-letter destination now, keeping ``reason``."""
        self._begin(_State.DEAD)
        self._consumer._settle_dead(self, str(reason))

    def touch(self) -> None:
        """Keep this message reserved for another lease; for handlers that run long.

        Where a broker gives an unsettled message to another consumer after a while
        (beanstalkd's TTR, sqlite's ``visibility_timeout``: the consumer's
        :attr:`~mqprimer.Consumer.delivery_lease`), this starts that time again. Elsewhere
        messages stay reserved until settled, and ``touch`` does nothing. Safe to call
        from a handler thread of a :class:`~mqprimer.Worker`.

        Raises :class:`StateError` once settled, :class:`ConnectionFailed` if the
        connection it arrived on was lost, and :class:`BrokerError` if the lease had
        already run out (the message may be with another consumer now).
        """
        state = self._current()
        if state is not _PENDING:
            raise StateError(f"message {self.id} is already settled ({state.value})")
        self._consumer._touch(self)

    def fail(self, error: BaseException | str) -> None:
        """Handler failure: retry by the consumer's :class:`RetryPolicy`, then dead-letter."""
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        policy = self._consumer.retry_policy
        if policy.should_retry(self.attempt):
            self.retry(policy.delay_for(self.attempt), error=reason)
        else:
            self.dead_letter(f"gave up after {self.attempt} attempt(s): {reason}")

    def _begin(self, new: _State) -> None:
        state = self._current()
        if state is not _PENDING:
            raise StateError(f"message {self.id} is already settled ({state.value})")
        self._state = new

    def _mark(self, state: _State) -> None:
        self._state = state

    def __repr__(self) -> str:
        return f"<Message id={self.id} type={self.type} attempt={self.attempt} {self._current().value}>"
