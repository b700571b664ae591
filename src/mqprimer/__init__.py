"""mqprimer: one Producer/Consumer API over AMQP, STOMP, XMPP, ZeroMQ, Gearman and Beanstalkd.

>>> import mqprimer
>>> with mqprimer.connect("memory://") as conn:
...     msg_id = conn.producer().send("jobs", {"n": 1})
...     with conn.consumer("jobs") as c:
...         m = c.receive(timeout=1)
...         m.ack()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .backend import Capabilities, Queue, QueueStats, Status, Support, Topic
from .client import Connection, Producer, default_url
from .consumer import Consumer
from .deadletters import DeadLetters
from .envelope import Envelope
from .errors import (
    AuthenticationError,
    BackendNotInstalled,
    BrokerError,
    ConfigurationError,
    ConnectionFailed,
    DeadLetter,
    EnvelopeError,
    InvalidURL,
    MessageTooLarge,
    MQError,
    RemoteError,
    Retry,
    StateError,
    Timeout,
    UnknownScheme,
    UnsupportedError,
)
from .message import Message
from .retry import RetryPolicy
from .url import URL

__version__ = "0.1.0"


def connect(url: "str | URL | Sequence[str | URL] | None" = None, **options: Any) -> Connection:
    """Connect to one broker URL, or to a list of them (failover in order).

    With no URL: ``MQPRIMER_URL``, else the embedded sqlite default (:func:`default_url`).
    A URL listing several hosts (``beanstalk://h1:11300,h2:11301``) counts as a list.
    Raises :class:`ConnectionFailed` / :class:`AuthenticationError` at once if no broker
    can be reached; options: ``max_message_size``, ``reconnect_timeout``, ``source``.
    """
    if url is None:
        url = default_url()
    raw = [url] if isinstance(url, (str, URL)) else list(url)
    if not raw:
        raise ConfigurationError("connect() needs at least one URL")
    urls = [u for r in raw for u in URL.parse(r).split_hosts()]
    conn = Connection(urls, **options)
    conn._open()
    return conn


def __getattr__(name: str) -> Any:
    if name == "Worker":  # imported lazily: the worker pulls in threads and signals
        from .worker import Worker

        return Worker
    raise AttributeError(f"module 'mqprimer' has no attribute {name!r}")


__all__ = [
    "URL", "AuthenticationError", "BackendNotInstalled", "BrokerError", "Capabilities", "ConfigurationError",
    "Connection", "ConnectionFailed", "Consumer", "DeadLetter", "DeadLetters", "Envelope", "EnvelopeError",
    "InvalidURL", "MQError", "Message", "MessageTooLarge", "Producer", "Queue", "QueueStats", "RemoteError",
    "Retry", "RetryPolicy", "StateError", "Status", "Support", "Timeout", "Topic", "UnknownScheme", "UnsupportedError",
    "Worker", "connect", "default_url",
]
