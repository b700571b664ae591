"""AMQP-style topic patterns (``*`` = one word, ``#`` = zero or more words), for backends that match themselves."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=4096)
def matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` (dot-separated words) matches ``pattern``."""
    return _match(tuple(pattern.split(".")), tuple(topic.split(".")))


def _match(p: tuple[str, ...], t: tuple[str, ...]) -> bool:
    if not p:
        return not t
    head = p[0]
    if head == "#":
        return any(_match(p[1:], t[i:]) for i in range(len(t) + 1))
    if not t:
        return False
    return (head == "*" or head == t[0]) and _match(p[1:], t[1:])
