"""Destination names: what a queue, a topic and a topic pattern may look like.

Checked once in the portable layer so that every backend sees only names it can map
(queues: 1-200 of ``A-Z a-z 0-9 _ . : -``; topics: dot-separated words; patterns:
words, ``*`` for one word, ``#`` for zero or more).
"""

from __future__ import annotations

import re

from .backend import Destination, Queue, Topic

_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,199}$")
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
_TOPIC_PATTERN = re.compile(r"^([A-Za-z0-9_\-]+|\*|#)(\.([A-Za-z0-9_\-]+|\*|#))*$")
_queue_cache: dict[str, Queue] = {}
_topic_names: set[str] = set()  # names that passed _TOPIC_NAME: send() skips the regex for them


def as_destination(dest: "str | Destination", *, pattern: bool = False) -> Destination:
    if isinstance(dest, str):
        cached = _queue_cache.get(dest)
        if cached is not None:
            return cached
        if not _QUEUE_NAME.match(dest):
            raise ValueError(f"invalid queue name {dest!r}: use 1-200 characters from A-Z a-z 0-9 _ . : -")
        if len(_queue_cache) < 10_000:
            _queue_cache[dest] = Queue(dest)
        return Queue(dest)
    if isinstance(dest, Queue):
        if not _QUEUE_NAME.match(dest.name):
            raise ValueError(
                f"invalid queue name {dest.name!r}: use 1-200 characters from A-Z a-z 0-9 _ . : -"
            )
        return dest
    if isinstance(dest, Topic):
        rx = _TOPIC_PATTERN if pattern else _TOPIC_NAME
        if not rx.match(dest.name):
            what = (
                "topic pattern (words, '*' or '#', dot-separated)"
                if pattern
                else "topic name (dot-separated words; no wildcards when sending)"
            )
            raise ValueError(f"invalid {what}: {dest.name!r}")
        if not pattern and len(_topic_names) < 10_000:
            _topic_names.add(dest.name)
        return dest
    raise TypeError(f"destination must be a str (queue) or mqprimer.Topic, not {type(dest).__name__}")


def is_pattern(dest: Destination) -> bool:
    return isinstance(dest, Topic) and any(w in ("*", "#") for w in dest.name.split("."))
