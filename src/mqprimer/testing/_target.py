"""The battery's target: one backend under test, its control, its figures (see :mod:`.battery`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import mqprimer
from mqprimer.backend import Capabilities, Queue, Topic

from ._stream import Stream
from .control import BrokerControl, Figures

FAULTS = (
    "broker SIGKILL mid-stream", "broker down at connect", "consumer SIGKILL", "frozen broker",
    "cut connection", "failover, consume from all", "poison and foreign input", "wrong credentials",
    "writer SIGKILL mid-transaction", "killed between copy and ack (retry)",
    "killed between copy and ack (dead letter)", "native TTL", "broker size limit", "peer absent at start",
)


@dataclass
class Target:
    id: str
    control: BrokerControl
    caps: Capabilities
    figures: Figures
    queue: str
    # a case run through mqprimer.aio (testing/_aio_bridge): it asserts the same guarantees, but
    # its figures would overwrite the blocking case's under the same id: they are not recorded
    aio: bool = False

    @property
    def url(self) -> str:
        return self.control.url

    @property
    def dest(self) -> str | Topic:
        """Where the battery's messages go: the queue, or a topic on a topic-only backend."""
        return self.dest_of(self.queue)

    def dest_of(self, name: str) -> str | Topic:
        return name if self.caps.queue else Topic(name)

    @property
    def raw_dest(self) -> Queue | Topic:
        """:attr:`dest` as the driver SPI takes it."""
        return Queue(self.queue) if self.caps.queue else Topic(self.queue)

    @property
    def at_least_once(self) -> bool:
        return self.caps.guarantee == "at-least-once"

    def only_for_lists(self, fault: str) -> None:
        """N/A on a host-list twin of another target (:attr:`BrokerControl.same_as`)."""
        if self.control.same_as:
            self.na(fault, f"same broker and driver as {self.control.same_as}: see its figures")

    def na(self, fault: str, reason: str) -> None:
        if not self.aio:
            self.figures.not_applicable(self.id, fault, reason)
        pytest.skip(f"N/A ({fault}): {reason}")

    def record(self, fault: str, started: float, **numbers: Any) -> None:
        if self.aio:
            return
        self.figures.record(self.id, fault, guarantee=self.caps.guarantee, wall_s=time.monotonic() - started,
                            **numbers)


@pytest.fixture
def target(mq_target: tuple[str, str], mq_control: BrokerControl, mq_figures: Figures,
           request: pytest.FixtureRequest) -> Iterator[Target]:
    with mqprimer.connect(mq_control.url) as conn:
        caps = conn.capabilities
    aio = request.node.get_closest_marker("mq_aio") is not None
    yield Target(mq_target[0], mq_control, caps, mq_figures, f"rb{uuid.uuid4().hex[:12]}", aio)


def _assert_guarantee(t: Target, fig: dict[str, Any], *, broker_died: bool, stream: Stream | None = None) -> None:
    """What the backend's declared guarantee allows for a fault (see the module docstring).

    An at-most-once backend whose documentation says a re-sent message is delivered again
    (:attr:`BrokerControl.resend_duplicates`) may duplicate the messages of the send calls
    under way at the fault (the portable layer publishes those again), and no others.
    """
    if t.at_least_once and (t.caps.persistent or not broker_died):
        assert fig["lost"] == 0, f"{fig['lost']} confirmed messages lost on an at-least-once backend: {fig}"
    if t.at_least_once:
        return
    if t.control.resend_duplicates and stream is not None:
        extra = stream.duplicated_ids() - stream.in_flight_at_fault()
        assert not extra, (f"{len(extra)} duplicated message(s) not in a send call under way at the fault, "
                           f"on an at-most-once backend ({t.control.resend_duplicates}): {fig}")
    else:
        assert fig["duplicated"] == 0, f"duplicates on an at-most-once backend: {fig}"


def _not_secret(t: Target, text: str) -> None:
    password = mqprimer.URL.parse(t.url).password
    assert not password or password not in text, "the password leaked into an error message"
