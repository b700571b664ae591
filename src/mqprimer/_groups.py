"""Named topic subscriptions in use in this process, for backends that cannot share one.

Where ``Capabilities.shared_subscription`` is UNSUPPORTED, a second consumer of the same
named subscription would not join a group: depending on the backend it would get every
message too (XMPP: each session subscribes on its own) or be turned away by the broker.
The portable layer refuses it up front with :class:`UnsupportedError` instead. It can only
see this process: the backend's docs say what happens across processes.
"""

from __future__ import annotations

import threading

from .backend import Capabilities, Topic
from .errors import UnsupportedError

_lock = threading.Lock()
Key = tuple[tuple[str, ...], str, str]
_held: set[Key] = set()


def claim(caps: Capabilities, endpoints: tuple[str, ...], topic: Topic, name: str) -> Key | None:
    """Reserve ``name`` on ``topic`` for one consumer, or raise if it has one already.

    Returns the key to :func:`release` (``None`` where the backend shares subscriptions).
    ``endpoints`` identify the broker(s), passwords hidden.
    """
    if caps.shared_subscription:
        return None
    key = (endpoints, topic.name, name)
    with _lock:
        if key in _held:
            raise UnsupportedError(
                f"the {caps.name} backend cannot share a named subscription between consumers "
                f"(shared_subscription is unsupported): subscription {name!r} on topic {topic.name!r} already "
                "has a consumer in this process, and a second one would not split its messages with it; "
                "close the first consumer, or give each consumer its own subscription name"
            )
        _held.add(key)
    return key


def release(key: Key | None) -> None:
    if key is not None:
        with _lock:
            _held.discard(key)
