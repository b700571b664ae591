"""The worker runtime: run a handler over every message of a destination, for ever.

The seed talk's "PHP daemons" slide, done right::

    def handle(message):             # keep workers dumb: one message type, one operation
        make_thumbnail(message.body["path"])

    mqprimer.Worker("sqlite:///jobs.db", "thumbnails", handle, concurrency=4,
                    max_messages=10_000, max_memory=200).run()

- One thread (the one calling :meth:`Worker.run`) owns the connection: it receives,
  and it settles every message. Handlers run on a bounded pool of ``concurrency``
  threads and hand their result back; ``prefetch`` bounds the messages in flight.
- Outcomes: the handler returns → ack; raises :class:`~mqprimer.Retry` → retry (after its
  delay); raises :class:`~mqprimer.DeadLetter` → dead letter now; raises anything else →
  retry by the :class:`~mqprimer.RetryPolicy`, then dead letter with
  ``"gave up after N attempt(s): Type: message"``. Retries never block other messages.
- Requests (:meth:`~mqprimer.Connection.request`): a handler's non-``None`` result is
  sent as the reply, then the request is acked; a request that ends dead-lettered gets
  an error reply (type ``mqprimer.error``), which its caller raises as
  :class:`~mqprimer.RemoteError` (docs/request-reply.md).
- First SIGTERM/SIGINT: stop taking messages, finish and settle the ones in flight,
  return :data:`EXIT_OK`. A second one: stop at once; unsettled messages go back to the
  broker; return ``128 + signal number``.
- Recycling: after ``max_messages`` handled, ``max_memory`` MiB of RSS or ``max_time``
  seconds, drain and return :data:`EXIT_RECYCLE` (75, ``EX_TEMPFAIL``) so that a
  supervisor starts a fresh process.
- Idle: the wait for a message grows up to ``idle_max`` seconds. Connection loss: the
  consumer resubscribes by itself; past its reconnect timeout the worker reconnects with
  exponential backoff (up to ``reconnect_max`` seconds). It never exits because a broker
  is down, and never spins.
- Logging (logger ``mqprimer.worker``): one line per message, ``outcome id destination
  attempt duration``, with the same fields in ``record.mq``; never bodies or passwords.
- Leases: where the broker gives an unsettled message to another consumer after a while
  (beanstalkd's TTR, sqlite's ``visibility_timeout``), a handler that runs longer loses
  it. ``touch_leases=True`` has the owner thread :meth:`~mqprimer.Message.touch` every
  message in flight each third of the lease, so a handler may run as long as it needs
  (and a hung one holds its message until the process ends); handlers can also call
  ``message.touch()`` themselves.
- Hooks: ``before(message)`` runs on the handler thread just before the handler;
  ``after(message, outcome)`` runs on the owner thread once the message is settled.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from ._worker_util import Outcome, check_positive, describe, emergency, hook, quote, rss_mib
from .backend import Destination
from .errors import BrokerError, ConnectionFailed, DeadLetter, Retry, StateError, UnsupportedError
from .message import Message, _State
from .retry import RetryPolicy
from .url import URL

log = logging.getLogger("mqprimer.worker")

EXIT_OK = 0
"""Stopped on request (first SIGTERM/SIGINT or :meth:`Worker.stop`), everything in flight settled."""
EXIT_USAGE = 2
"""Bad configuration: the CLI's exit code for an unusable handler or option."""
EXIT_RECYCLE = 75
"""Recycled (``max_messages``, ``max_memory`` or ``max_time`` reached): start a fresh process."""

_IDLE_MIN = 0.05
_RELEASED = StateError("released unhandled while stopping")
_BUSY_POLL = 0.02  # how long the owner waits for a result while it could still take messages


Handler = Callable[[Message], object]
BeforeHook = Callable[[Message], object]
AfterHook = Callable[[Message, Outcome], object]


class Worker:
    """Consume ``destination`` with ``handler`` until stopped, recycled or aborted.

    ``url`` is a URL, a list of URLs (consumed from all at once: high availability) or
    ``None`` (``MQPRIMER_URL``, else the embedded sqlite default).
    """

    def __init__(
        self,
        url: "str | URL | Sequence[str | URL] | None",
        destination: "str | Destination",
        handler: Handler,
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
        retry: RetryPolicy | None = None,
        max_messages: int | None = None,
        max_memory: float | None = None,
        max_time: float | None = None,
        idle_max: float = 1.0,
        reconnect_max: float = 30.0,
        subscription: str | None = None,
        before: BeforeHook | None = None,
        after: AfterHook | None = None,
        handle_signals: bool = True,
        connect_options: dict[str, Any] | None = None,
        touch_leases: bool = False,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        check_positive("concurrency", concurrency, integer=True)
        if prefetch is not None:
            check_positive("prefetch", prefetch, integer=True)
        for name, value in (("max_messages", max_messages), ("max_memory", max_memory), ("max_time", max_time)):
            if value is not None:
                check_positive(name, value, integer=name == "max_messages")
        check_positive("idle_max", idle_max)
        check_positive("reconnect_max", reconnect_max)
        self.url = url
        self.destination = destination
        self.handler = handler
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else max(10, 2 * concurrency)
        self.retry_policy = retry or RetryPolicy()
        self.max_messages = max_messages
        self.max_memory = max_memory
        self.max_time = max_time
        self.idle_max = idle_max
        self.reconnect_max = reconnect_max
        self.subscription = subscription
        self.before = before
        self.after = after
        self.handle_signals = handle_signals
        self.connect_options = dict(connect_options or {})
        self.touch_leases = touch_leases
        self._leases: dict[Message, float] = {}  # in flight -> when to touch it next (touch_leases)
        self._lease_every: float | None = None
        self._next_touch = float("inf")
        self.handled = 0  # messages settled (or lost) so far
        self.stats: dict[str, int] = {"ack": 0, "retry": 0, "dead-letter": 0, "lost": 0}
        self._received = 0
        self._inflight = 0
        self._results: queue.SimpleQueue[tuple[Message, BaseException | None, float]] = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._signalled = False
        self._release = False  # set on stop: messages not started yet are given back, not handled
        self._draining: str | None = None  # why we stopped taking messages
        self._exit_code = EXIT_OK
        self._abort_code: int | None = None
        self._started = 0.0
        self._next_mem_check = 0.0
        self._warned_delay = False
        self._dest_name = destination if isinstance(destination, str) else getattr(destination, "name", "?")

    # -- control (thread-safe, also used by the signal handlers) --------------------------
    def stop(self) -> None:
        """Stop taking messages; :meth:`run` returns once the in-flight ones are settled."""
        if self._draining is None:
            self._draining = "stop requested"
        self._release = True

    def abort(self, code: int = 1) -> None:
        """Stop at once; unsettled messages go back to the broker."""
        self._abort_code = code

    # -- running ------------------------------------------------------------------------
    def run(self) -> int:
        """Consume until stopped or recycled; return the exit code (see the module docs)."""
        restore = self._install_signals()
        self._started = time.monotonic()
        self._start_pool()
        try:
            return self._run()
        finally:
            for _ in self._threads:
                self._jobs.put(None)
            for signum, previous in restore:
                signal.signal(signum, previous)

    def _run(self) -> int:
        from . import connect

        backoff = 0.5
        first = True
        while True:
            if self._abort_code is not None:
                return self._abort_code
            if self._draining is not None and self._inflight == 0:
                return self._exit_code
            try:
                conn = connect(self.url, **self.connect_options)
            except ConnectionFailed as exc:
                backoff = self._backoff(exc, backoff, "connect")
                continue
            try:
                consumer = conn.consumer(
                    self.destination, prefetch=self.prefetch, subscription=self.subscription,
                    retry=self.retry_policy,
                )
            except ConnectionFailed as exc:
                conn.close()
                backoff = self._backoff(exc, backoff, "subscribe")
                continue
            except BaseException:
                conn.close()
                raise
            if first:
                log.info(
                    "worker started: destination=%s url=%s concurrency=%d prefetch=%d pid=%d",
                    self._dest_name, ", ".join(str(u) for u in conn.urls), self.concurrency, self.prefetch, os.getpid(),
                )
                first = False
            else:
                log.info("reconnected: destination=%s", self._dest_name)
            try:
                code = self._consume(consumer)
                if code is not None:
                    return code
                backoff = 0.5
            except BrokerError as exc:  # lost for longer than the consumer's reconnect timeout
                backoff = self._backoff(exc, backoff, "consume")
            finally:
                consumer.close()  # unsettled messages go back to the broker
                conn.close()

    def _backoff(self, exc: BaseException, delay: float, what: str) -> float:
        wait = delay * random.uniform(0.8, 1.2)
        log.warning("%s failed: %s; retrying in %.1fs", what, exc, wait)
        self._sleep(wait)
        return min(delay * 2, self.reconnect_max)

    def _sleep(self, seconds: float) -> None:
        """Wait, waking early for a stop or abort (and settling results meanwhile)."""
        deadline = time.monotonic() + seconds
        while self._abort_code is None:
            left = deadline - time.monotonic()
            if left <= 0 or (self._draining is not None and self._inflight == 0):
                return
            self._wait_result(min(left, 0.25))

    def _consume(self, consumer: Any) -> int | None:
        idle = _IDLE_MIN
        lease = consumer.delivery_lease if self.touch_leases else None
        self._lease_every = lease / 3 if lease else None
        self._leases.clear()
        self._next_touch = float("inf")
        while True:
            if self._abort_code is not None:
                return self._abort_code
            if self._leases and time.monotonic() >= self._next_touch:
                self._touch_due()
            self._settle_ready()
            self._check_limits()
            if self._draining is not None:
                if self._inflight == 0:
                    return self._exit_code
                self._wait_result(0.25)
                continue
            if self._inflight < self.prefetch:
                msg = consumer.receive(timeout=0.0 if self._inflight else idle)
                if msg is not None:
                    idle = _IDLE_MIN
                    self._received += 1
                    self._inflight += 1
                    if self._lease_every is not None:
                        due = time.monotonic() + self._lease_every
                        self._leases[msg] = due
                        self._next_touch = min(self._next_touch, due)
                    self._jobs.put(msg)
                    continue
                if not self._inflight:
                    idle = min(idle * 2, self.idle_max)
                    continue
                self._wait_result(_BUSY_POLL)
            else:
                self._wait_result(0.25)

    def _touch_due(self) -> None:
        """Touch the in-flight messages whose lease is a third gone (owner thread)."""
        assert self._lease_every is not None
        now = time.monotonic()
        for msg, due in list(self._leases.items()):
            if due > now:
                continue
            try:
                msg.touch()
                self._leases[msg] = now + self._lease_every
            except StateError:  # settled meanwhile
                del self._leases[msg]
            except (ConnectionFailed, BrokerError) as exc:
                del self._leases[msg]
                log.warning("could not renew the lease of message %s (%s); it may be delivered again", msg.id, exc)
        self._next_touch = min(self._leases.values(), default=float("inf"))

    def _check_limits(self) -> None:
        if self._draining is not None:
            return
        reason = None
        if self.max_messages is not None and self._received >= self.max_messages:
            reason = f"max_messages={self.max_messages} reached"
        elif self.max_time is not None and time.monotonic() - self._started >= self.max_time:
            reason = f"max_time={self.max_time:g}s reached"
        elif self.max_memory is not None:
            now = time.monotonic()
            if now >= self._next_mem_check:
                self._next_mem_check = now + 0.5
                rss = rss_mib()
                if rss is not None and rss >= self.max_memory:
                    reason = f"max_memory={self.max_memory:g}MiB reached (RSS {rss:.1f} MiB)"
        if reason is not None:
            log.info("recycling: %s; draining %d in-flight message(s)", reason, self._inflight)
            self._draining = reason
            self._exit_code = EXIT_RECYCLE

    # -- the pool -----------------------------------------------------------------------
    def _start_pool(self) -> None:
        for i in range(self.concurrency):
            # daemon threads: an aborting worker must not wait for a stuck handler
            t = threading.Thread(target=self._work, name=f"mqprimer-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _work(self) -> None:
        handler, before, results = self.handler, self.before, self._results
        while True:
            msg = self._jobs.get()
            if msg is None:
                return
            if self._release:  # stopping: what has not started goes back to the broker
                results.put((msg, _RELEASED, 0.0))
                continue
            error: BaseException | None = None
            start = time.perf_counter()
            try:
                if before is not None:
                    hook(before, msg)
                result = handler(msg)
                if result is not None and msg.reply_to is not None and not msg._replied:
                    msg.reply(result)  # a request: the result is the reply, sent before the ack
            except BaseException as exc:  # every failure is an outcome, even SystemExit from a handler
                error = exc
            results.put((msg, error, time.perf_counter() - start))

    def _wait_result(self, timeout: float) -> None:
        try:
            item = self._results.get(timeout=timeout)
        except queue.Empty:
            return
        self._settle(*item)
        self._settle_ready()

    def _settle_ready(self) -> None:
        results = self._results
        while not results.empty():  # only this thread takes results: empty() is exact enough
            self._settle(*results.get_nowait())

    # -- settling (owner thread only) -----------------------------------------------------
    def _settle(self, msg: Message, error: BaseException | None, duration: float) -> None:
        self._inflight -= 1
        self._leases.pop(msg, None)
        note = ""
        if self._abort_code is not None or error is _RELEASED:
            return  # left unsettled: it goes back to the broker when the consumer closes
        try:
            if error is None:
                msg.ack()
                what = "ack"
            elif isinstance(error, Retry):
                self._retry(msg, error.delay, error.reason)
                what = "retry"
            elif isinstance(error, DeadLetter):
                msg.dead_letter(error.reason)
                what = "dead-letter"
            else:
                reason = describe(error)
                policy = self.retry_policy
                if policy.should_retry(msg.attempt):
                    self._retry(msg, policy.delay_for(msg.attempt), reason)
                    what = "retry"
                else:
                    msg.dead_letter(f"gave up after {msg.attempt} attempt(s): {reason}")
                    what = "dead-letter"
        except ConnectionFailed as exc:
            what = "lost"  # the broker delivers it again
            note = f" not_settled={quote(str(exc))}"
        except UnsupportedError as exc:
            # the backend can neither retry nor dead-letter it: it stays unsettled and goes back
            # to the broker when the consumer closes, rather than being dropped
            what = "lost"
            note = f" not_settled={quote(str(exc))}"
        except BrokerError as exc:
            # e.g. its lease ran out (beanstalkd NOT_FOUND, sqlite "reservation ran out"): the
            # message is another consumer's now; this one goes on (see touch_leases)
            what = "lost"
            note = f" not_settled={quote(str(exc))}"
        except StateError:
            if msg._state in (_State.RETURNED, _State.LOST):  # its connection went away meanwhile
                what = "lost"
                note = " not_settled=\"connection lost while the handler ran; the broker delivers it again\""
            else:
                log.warning("message %s was settled by its handler; return or raise instead", msg.id)
                what = "ack" if error is None else "lost"
        self.handled += 1
        self.stats[what] += 1
        level = logging.INFO if what == "ack" else logging.WARNING
        logged = log.isEnabledFor(level)
        if not logged and self.after is None:
            return  # the hot path: nobody looks at this outcome
        outcome = Outcome(msg.id, self._dest_name, msg.attempt, what, duration, error)
        if logged:
            err = f" error={quote(describe(error))}" if error is not None else ""
            log.log(
                level, "%s id=%s destination=%s attempt=%d duration_ms=%.2f%s%s",
                what, msg.id, self._dest_name, msg.attempt, duration * 1000, err, note, extra={"mq": outcome.fields()},
            )
        if self.after is not None:
            hook(self.after, msg, outcome)

    def _retry(self, msg: Message, delay: float | None, reason: str) -> None:
        try:
            msg.retry(delay or None, error=reason)
        except UnsupportedError:
            if not self._warned_delay:
                self._warned_delay = True
                log.warning("this backend cannot delay a retry; retrying at once (configure a broker with delays)")
            msg.retry(None, error=reason)

    # -- helpers ------------------------------------------------------------------------
    def _install_signals(self) -> list[tuple[int, Any]]:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return []
        restore: list[tuple[int, Any]] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            restore.append((signum, signal.getsignal(signum)))
            signal.signal(signum, self._on_signal)
        return restore

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self._signalled:
            self._signalled = True
            self._draining = name
            self._exit_code = EXIT_OK  # asked to stop: even a recycle in progress now ends "done"
            self._release = True
            emergency(f"{name} received: finishing {self._inflight} in-flight message(s); send again to abort")
            return
        emergency(f"{name} received again: aborting; unsettled messages go back to the broker")
        self.abort(128 + signum)


__all__ = ["EXIT_OK", "EXIT_RECYCLE", "EXIT_USAGE", "Outcome", "Worker", "rss_mib"]
