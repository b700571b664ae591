"""Every exception mqprimer raises, in one tree.

::

    MQError                         base of everything below
    ├── ConfigurationError          the call or URL cannot work as written
    │   ├── InvalidURL              malformed connection URL
    │   ├── UnknownScheme           no backend for the URL scheme (close matches suggested)
    │   └── BackendNotInstalled     the backend's client library is missing (says what to pip install)
    ├── UnsupportedError            the backend cannot honour an option or model (and does not emulate it)
    ├── StateError                  settling a message twice, using a closed producer/consumer
    ├── EnvelopeError               a payload that is not a valid mqprimer/CloudEvents envelope
    ├── MessageTooLarge             refused before sending: over the configured or the broker's limit
    ├── RemoteError                 a request's handler failed: its error reply (``reason``), not a timeout
    └── BrokerError                 talking to the broker failed
        ├── ConnectionFailed        broker unreachable, or the connection was lost
        │   └── AuthenticationError wrong credentials, or access refused
        └── Timeout                 the broker did not answer in time

    Retry, DeadLetter               raised by handlers to choose an outcome (not errors)

Messages never contain passwords or message bodies.
"""

from __future__ import annotations


class MQError(Exception):
    """Base class of every mqprimer error."""


class ConfigurationError(MQError):
    """The request cannot work as written; fix the call or the URL."""


class InvalidURL(ConfigurationError):
    """A connection URL that cannot be parsed."""


class UnknownScheme(ConfigurationError):
    """No backend is registered for a URL scheme."""


class BackendNotInstalled(ConfigurationError):
    """The client library a backend needs is not installed."""


class UnsupportedError(MQError):
    """The backend cannot do what was asked and does not emulate it."""


class StateError(MQError):
    """An operation that the object's state forbids (double settle, use after close)."""


class EnvelopeError(MQError):
    """Input that is not a valid envelope. Raised for every malformed payload, never another type."""


class MessageTooLarge(MQError):
    """A message over the size limit, refused before it was sent."""


class RemoteError(MQError):
    """The service that took a request failed it: its error reply (type ``mqprimer.error``) says why.

    ``reason`` is the dead-letter reason the serving side recorded; ``reply`` is the reply
    :class:`~mqprimer.Message` itself.
    """

    def __init__(self, reason: str, reply: object = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class BrokerError(MQError):
    """Talking to the broker failed."""


class ConnectionFailed(BrokerError):
    """The broker cannot be reached, or the connection to it was lost."""


class AuthenticationError(ConnectionFailed):
    """The broker refused the credentials or the access."""


class Timeout(BrokerError):
    """The broker did not answer in time."""


class Retry(Exception):
    """Raise from a handler to retry the message, optionally after ``delay`` seconds."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


class DeadLetter(Exception):
    """Raise from a handler to dead-letter the message now, with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
