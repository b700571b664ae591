"""A consumer's subscription on one endpoint: the state a reconnect rebuilds.

Its own module so that :mod:`.consumer` (which creates it) and :mod:`.message` (which
keeps the one a message arrived on) both import it from below.
"""

from __future__ import annotations

import threading

from ._endpoint import Endpoint
from .backend import Destination, Subscription


class _Sub:
    """A consumer's subscription on one endpoint, rebuilt after reconnects."""

    __slots__ = ("ep", "sub", "generation", "next_try", "backoff", "down_since", "destination", "lock", "made_on")

    def __init__(self, ep: Endpoint, destination: Destination) -> None:
        self.ep = ep
        self.sub: Subscription | None = None
        self.generation = 0
        self.next_try = 0.0
        self.backoff = 0.05
        self.down_since: float | None = None
        self.destination = destination
        self.lock = threading.RLock()
        self.made_on = 0  # the endpoint's generation (its backend instance) that ``sub`` lives on
