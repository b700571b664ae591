"""mqprimer.aio: the asyncio twin of the public API, on every backend.

>>> import asyncio, mqprimer.aio
>>> async def main() -> None:
...     async with mqprimer.aio.connect("memory://") as conn:
...         await conn.producer().send("jobs", {"n": 1})
...         async with conn.consumer("jobs") as c:
...             m = await c.receive(timeout=1)
...             await m.ack()
>>> asyncio.run(main())

Same names as the blocking API, awaited where they may wait on a broker. The twin adapts
the blocking portable layer (envelopes, capability checks, retry policy, emulated retry and
dead letters, failover, reconnect all exist once) and runs its calls on threads owned by the
aio objects, or on the loop itself where a driver's call cannot wait (Capabilities.nowait) or
offers an asyncio path on the loop's own sockets (backend.py's asyncio SPI: beanstalk), so no
call blocks the event loop, whatever the broker does. See docs/asyncio.md.
"""

from __future__ import annotations

from typing import Any

from ..backend import Capabilities, Queue, QueueStats, Status, Topic
from ..errors import (
    ConnectionFailed,
    DeadLetter,
    MQError,
    RemoteError,
    Retry,
    StateError,
    Timeout,
    UnsupportedError,
)
from ..retry import RetryPolicy
from ._conn import Connection, DeadLetters, Producer, connect
from ._consumer import Consumer, Message


def __getattr__(name: str) -> Any:
    if name == "Worker":  # imported lazily, like mqprimer.Worker
        from ._worker import Worker

        return Worker
    raise AttributeError(f"module 'mqprimer.aio' has no attribute {name!r}")


__all__ = [
    "Capabilities", "Connection", "ConnectionFailed", "Consumer", "DeadLetter", "DeadLetters", "MQError", "Message",
    "Producer", "Queue", "QueueStats", "RemoteError", "Retry", "RetryPolicy", "StateError", "Status", "Timeout",
    "Topic", "UnsupportedError", "Worker", "connect",
]
