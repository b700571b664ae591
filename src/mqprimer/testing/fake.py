"""A fake backend whose capability record a test chooses: ``fake://name?unsupported=retry,ttl``.

It is ``memory://`` underneath (connections with the same name share one in-process
broker), declaring as ``UNSUPPORTED`` the features listed in ``unsupported``. It holds the
portable layer to the driver rules: an option or outcome the record does not declare
reaches the driver only by mistake, and the fake then fails loudly instead of doing it.

It is not in the backend registry. Use it through :func:`fake_scheme`, which makes
``fake://`` resolvable for the duration of a ``with`` block only::

    with fake_scheme(), mqprimer.connect("fake://t1?unsupported=retry") as conn:
        ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from .. import registry
from ..backend import (
    FEATURES,
    NATIVE,
    UNSUPPORTED,
    Capabilities,
    Delivery,
    Destination,
    Status,
    Subscription,
    Topic,
)
from ..backends.memory import CAPABILITIES as _MEMORY
from ..backends.memory import MemoryBackend
from ..errors import ConfigurationError

SCHEME = "fake"


class DriverRuleBroken(AssertionError):
    """The portable layer passed the driver something its capability record does not declare."""


def _capabilities(unsupported: str | None, guarantee: str | None) -> Capabilities:
    names = [n.strip() for n in (unsupported or "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(FEATURES))
    if unknown:
        raise ConfigurationError(
            f"fake://: unsupported= names unknown feature(s) {', '.join(unknown)}; known: {', '.join(FEATURES)}"
        )
    if guarantee not in (None, "at-least-once", "at-most-once"):
        raise ConfigurationError("fake://: guarantee must be at-least-once or at-most-once")
    return dataclasses.replace(
        _MEMORY, name=SCHEME, guarantee=guarantee or _MEMORY.guarantee, notes="test double (memory underneath)",
        **{n: UNSUPPORTED for n in names},  # type: ignore[arg-type]
    )


class FakeBackend(MemoryBackend):
    capabilities = dataclasses.replace(_MEMORY, name=SCHEME)
    url_params = frozenset({"unsupported", "guarantee"})

    def open(self) -> None:
        self.capabilities = _capabilities(self.url.param("unsupported"), self.url.param("guarantee"))
        super().open()

    def _refuse(self, feature: str, given: bool) -> None:
        if given and getattr(self.capabilities, feature) is UNSUPPORTED:
            raise DriverRuleBroken(f"the driver was given {feature}, which its capabilities declare unsupported")

    def publish(
        self, destination: Destination, payload: bytes, *, message_id: str,
        priority: int | None = None, delay: float | None = None, ttl: float | None = None,
    ) -> None:
        self._refuse("topic", isinstance(destination, Topic))
        self._refuse("queue", not isinstance(destination, Topic))
        self._refuse("priority", priority is not None)
        self._refuse("delay", bool(delay))
        self._refuse("ttl", ttl is not None)
        super().publish(destination, payload, message_id=message_id, priority=priority, delay=delay, ttl=ttl)

    def subscribe(self, destination: Destination, *, prefetch: int, subscription: str | None = None) -> Subscription:
        self._refuse("topic", isinstance(destination, Topic))
        self._refuse("queue", not isinstance(destination, Topic))
        return _FakeSub(self, super().subscribe(destination, prefetch=prefetch, subscription=subscription))

    def status(self, message_id: str) -> Status:
        self._refuse("status", True)
        return super().status(message_id)


class _FakeSub(Subscription):
    """The memory subscription, refusing the native outcomes the fake's record does not declare."""

    def __init__(self, backend: FakeBackend, inner: Subscription) -> None:
        self.backend = backend
        self.inner = inner
        self.destination = inner.destination
        self.retry_target = inner.retry_target
        self.dead_target = inner.dead_target

    def receive(self, timeout: float | None) -> Delivery | None:
        return self.inner.receive(timeout)

    def ack(self, delivery: Delivery) -> None:
        self.inner.ack(delivery)

    def requeue(self, delivery: Delivery) -> None:
        self.inner.requeue(delivery)

    def retry(self, delivery: Delivery, payload: bytes, delay: float) -> None:
        if self.backend.capabilities.retry is not NATIVE:
            raise DriverRuleBroken("native retry called on a backend that does not declare it native")
        self.inner.retry(delivery, payload, delay)

    def dead_letter(self, delivery: Delivery, payload: bytes, reason: str) -> None:
        if self.backend.capabilities.dead_letter is not NATIVE:
            raise DriverRuleBroken("native dead letter called on a backend that does not declare it native")
        self.inner.dead_letter(delivery, payload, reason)

    def close(self) -> None:
        self.inner.close()


@contextmanager
def fake_scheme() -> Iterator[str]:
    """Make ``fake://`` URLs resolvable inside the block; the registry is as before afterwards."""
    cache = registry._cache
    before = cache.get(SCHEME)
    cache[SCHEME] = FakeBackend
    try:
        yield SCHEME
    finally:
        if before is None:
            cache.pop(SCHEME, None)
        else:
            cache[SCHEME] = before


__all__ = ["SCHEME", "DriverRuleBroken", "FakeBackend", "fake_scheme"]
