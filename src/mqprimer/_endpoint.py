"""One broker endpoint: a backend instance, its lock, and error mapping.

The portable layer's only door to a driver. It opens the backend lazily, maps the
driver's library errors onto mqprimer's tree (with the password scrubbed from every
message), and throws a broken backend away so the next call reconnects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from . import registry
from .backend import Backend, Capabilities
from .errors import AuthenticationError, BrokerError, ConfigurationError, ConnectionFailed, MQError
from .url import URL

log = logging.getLogger("mqprimer")
T = TypeVar("T")


class Endpoint:
    def __init__(self, url: URL, parent: "Endpoint | None" = None) -> None:
        self.url = url
        # the endpoint whose broker connection this one shares where its backend offers that
        # (Backend.reply_sharer: a Connection's reply path on AMQP), else None
        self.parent = parent
        self.cls = registry.get(url.scheme)
        unknown = sorted({k for k, _ in url.query} - self.cls.url_params)
        if unknown:
            known = ", ".join(sorted(self.cls.url_params)) or "none"
            raise ConfigurationError(
                f"{url}: unknown option(s) {', '.join(unknown)} for the {url.scheme}:// backend "
                f"(it understands: {known})"
            )
        self.backend: Backend | None = None
        self.generation = 0
        self.lock = threading.RLock()
        self._caps: Capabilities | None = None

    @property
    def capabilities(self) -> Capabilities:
        if self.backend is not None:
            return self.backend.capabilities
        if self._caps is not None:
            return self._caps
        return self.cls.capabilities

    def ensure(self) -> Backend:
        """The open backend, connecting first if needed."""
        with self.lock:
            if self.backend is None:
                backend = self._shared() if self.parent is not None else None
                if backend is not None:
                    self.backend = backend
                    self._caps = backend.capabilities
                    self.generation += 1
                    return backend
                backend = self.cls(self.url)
                try:
                    backend.open()
                except BaseException as exc:
                    try:
                        backend.close()
                    except Exception:
                        pass
                    raise self.translate(exc, "connect") from None
                self.backend = backend
                self._caps = backend.capabilities
                self.generation += 1
                log.debug("connected to %s", self.url)
            return self.backend

    def _shared(self) -> Backend | None:
        """An open backend on the parent's broker connection, or ``None`` if its backend offers
        none. A shared connection found dead is reset on the parent (if nobody replaced it
        meanwhile) and tried once more, so the caller need not fail once to reconnect it."""
        assert self.parent is not None
        for attempt in (1, 2):
            owner = self.parent.ensure()
            view = owner.reply_sharer()
            if view is None:
                return None
            try:
                view.open()
                return view
            except BaseException as exc:
                err = self.translate(exc, "connect")
                if attempt == 2 or not isinstance(err, ConnectionFailed):
                    raise err from None
                with self.parent.lock:
                    if self.parent.backend is owner:
                        self.parent.reset()
        return None  # not reached

    def call(self, what: str, fn: Callable[[Backend], T]) -> T:
        """Run ``fn(backend)`` under the lock, mapping errors; a lost connection resets."""
        with self.lock:
            backend = self.ensure()
            try:
                return fn(backend)
            except BaseException as exc:
                err = self.translate(exc, what)
                if isinstance(err, ConnectionFailed):
                    self.reset()
                raise err from None

    def reset(self) -> None:
        """Forget a broken backend; the next call reconnects."""
        with self.lock:
            backend, self.backend = self.backend, None
            if backend is not None:
                try:
                    backend.close()
                except Exception:
                    pass

    def translate(self, exc: BaseException, what: str) -> BaseException:
        if isinstance(exc, MQError) or not isinstance(exc, Exception):
            return exc
        detail = self.scrub(f"{type(exc).__name__}: {exc}".rstrip(": "))
        if self.cls.auth_errors and isinstance(exc, self.cls.auth_errors):
            return AuthenticationError(
                f"{self.url}: the broker refused the credentials or access ({detail}); "
                "check the user name, password and permissions in the URL"
            )
        if isinstance(exc, self.cls.connection_errors):
            return ConnectionFailed(f"{self.url}: {what} failed, broker unreachable or connection lost ({detail})")
        return BrokerError(f"{self.url}: {what} failed ({detail})")

    def scrub(self, text: str) -> str:
        pw = self.url.password
        text = text[:500]
        return text.replace(pw, "***") if pw else text
