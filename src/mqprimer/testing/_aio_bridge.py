"""Run the conformance suite and the battery through :mod:`mqprimer.aio`, unchanged.

A pytest plugin (loaded by :mod:`mqprimer.testing.plugin`). With ``--mq-aio=both`` (or
``MQPRIMER_AIO=both``) every ``mq_url`` / ``mq_target`` case runs twice, the second time with
the id suffix ``-aio`` and the ``mq_aio`` marker; ``--mq-aio=only`` runs only the aio cases,
``off`` (the default) none; ``drivers`` runs every case blocking and adds the aio cases once
per driver (not for TLS twins, ``-ha`` host lists or ``zmq-ipc``: same driver, same twin code),
which costs about 60% of ``both``. In an aio case ``mqprimer.connect`` and ``mqprimer.Worker`` are
patched to bridges that present the twin as the blocking API: each call is a coroutine run
on one event loop in a background thread (as an asyncio application would run it), with
async handlers for the Worker. That loop runs in debug mode with a tight
``slow_callback_duration``: a callback that held it longer fails the test (the twin must never
block its loop, whatever the broker does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

import mqprimer
from mqprimer import aio

T = TypeVar("T")
MODES = ("off", "both", "only", "drivers")
# seconds a callback may hold the bridge's loop: above what OS preemption alone causes on a loaded
# 2-core machine (~90 ms measured alone; 0.29 s for a task step of a STOMP send_many case in a CI
# run with three xdist workers beside the brokers), below a call that waits on a broker (the breaks
# of tests/test_aio_faults.py held the loop 1.0-2.5 s)
SLOW_CALLBACK = float(os.environ.get("MQPRIMER_AIO_SLOW", "0.5"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("mqprimer").addoption(
        "--mq-aio", default=os.environ.get("MQPRIMER_AIO", "off"), choices=MODES, dest="mq_aio",
        help="also run the conformance suite and battery through mqprimer.aio: off (default), both, only, "
             "drivers (both, but aio once per driver) (default from MQPRIMER_AIO)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mq_aio: a conformance or battery case run through mqprimer.aio")
    config.addinivalue_line("markers", "disruptive: kills, freezes or restarts a shared broker")


def api_params(config: pytest.Config, specs: list[tuple[str, str]],
               value: Callable[[str, str], object]) -> list[Any]:
    """The parameters of ``mq_url`` / ``mq_target``: each spec blocking, aio, or both (``--mq-aio``)."""
    mode = config.getoption("mq_aio", "off") or "off"
    out: list[Any] = []
    for i, u in specs:
        if mode != "only":
            out.append(pytest.param(value(i, u), id=i))
        if mode == "both" or mode == "only" or (mode == "drivers" and not _twin(i, u)):
            out.append(pytest.param(value(i, u), id=f"{i}-aio", marks=pytest.mark.mq_aio))
    return out


def _twin(url_id: str, url: str) -> bool:
    """A URL that another one already covers with the same driver: TLS, a host list, zmq+ipc."""
    scheme, _, rest = url.partition("://")
    hosts = rest.split("/", 1)[0]
    return ("," in hosts or url_id.endswith("-ha") or url_id == "xmpps" or scheme in ("amqps", "zmq+ipc")
            or scheme.endswith(("+ssl", "+tls")))


class Loop:
    """One event loop in a daemon thread; ``run(coro)`` from any other thread."""

    def __init__(self, slow: float = SLOW_CALLBACK) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = slow
        self.slow: list[str] = []
        self._thread = threading.Thread(target=self.loop.run_forever, name="mqprimer-aio-bridge", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_await(coro), self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def _await(aw: Awaitable[T]) -> T:
    return await aw


class SlowCallbacks(logging.Handler):
    """Collects asyncio's debug-mode reports of a callback that held the loop too long."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "took" in text and ("Executing" in text or "seconds" in text):
            self.reports.append(text)


_LOOP: Loop | None = None


def bridge_loop() -> Loop:
    global _LOOP
    if _LOOP is None:
        _LOOP = Loop()
    return _LOOP


@pytest.fixture(autouse=True)
def _mq_api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("mq_aio") is None:
        yield
        return
    loop = bridge_loop()
    slow = SlowCallbacks()
    logging.getLogger("asyncio").addHandler(slow)
    monkeypatch.setattr(mqprimer, "connect", lambda url=None, **kw: BConnection(loop, loop.run(aio.connect(url, **kw))))
    monkeypatch.setattr(mqprimer, "Worker", lambda *a, **kw: BWorker(loop, *a, **kw), raising=False)
    try:
        yield
    finally:
        logging.getLogger("asyncio").removeHandler(slow)
    assert not slow.reports, f"the event loop was blocked: {slow.reports[:3]}"


class _Wrapped:
    """Attributes this bridge does not define come from the aio object, then its blocking one."""

    _aio: Any

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("_aio")
        if inner is None:
            raise AttributeError(name)
        try:
            return getattr(inner, name)
        except AttributeError:
            return getattr(inner.blocking, name)


class BConnection(_Wrapped):
    _aio: aio.Connection

    def __init__(self, loop: Loop, conn: aio.Connection) -> None:
        self._loop, self._aio = loop, conn

    def producer(self) -> "BProducer":
        return BProducer(self._loop, self._aio.producer())

    def consumer(self, destination: Any, **kw: Any) -> "BConsumer":
        return BConsumer(self._loop, self._loop.run(self._aio.consumer(destination, **kw)))

    def request(self, destination: str, body: Any, **kw: Any) -> "BMessage":
        return BMessage(self._loop, self._loop.run(self._aio.request(destination, body, **kw)))

    def status(self, message_id: str) -> Any:
        return self._loop.run(self._aio.status(message_id))

    def stats(self, queue: str) -> Any:
        return self._loop.run(self._aio.stats(queue))

    def dead_letters(self, queue: str) -> "BDeadLetters":
        return BDeadLetters(self._loop, self._aio.dead_letters(queue))

    def close(self) -> None:
        self._loop.run(self._aio.close())

    def __enter__(self) -> "BConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BProducer(_Wrapped):
    _aio: aio.Producer

    def __init__(self, loop: Loop, producer: aio.Producer) -> None:
        self._loop, self._aio = loop, producer

    def send(self, destination: Any, body: Any, **kw: Any) -> str:
        return self._loop.run(self._aio.send(destination, body, **kw))

    def send_many(self, messages: Any) -> list[str]:
        return self._loop.run(self._aio.send_many(messages))


class BConsumer(_Wrapped):
    _aio: aio.Consumer

    def __init__(self, loop: Loop, consumer: aio.Consumer) -> None:
        self._loop, self._aio = loop, consumer

    def receive(self, timeout: float | None = None) -> "BMessage | None":
        m = self._loop.run(self._aio.receive(timeout))
        return None if m is None else BMessage(self._loop, m)

    def __iter__(self) -> Iterator["BMessage"]:
        it = self._aio.__aiter__()
        while True:
            try:
                yield BMessage(self._loop, self._loop.run(it.__anext__()))
            except StopAsyncIteration:
                return

    def close(self) -> None:
        self._loop.run(self._aio.close())

    def __enter__(self) -> "BConsumer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BMessage(_Wrapped):
    _aio: aio.Message

    def __init__(self, loop: Loop, message: aio.Message) -> None:
        self.__dict__.update(_loop=loop, _aio=message)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._aio.blocking, name, value)  # e.g. a test's m._replied = False

    def ack(self) -> None:
        self._loop.run(self._aio.ack())

    def retry(self, delay: float | None = None, **kw: Any) -> None:
        self._loop.run(self._aio.retry(delay, **kw))

    def dead_letter(self, reason: str) -> None:
        self._loop.run(self._aio.dead_letter(reason))

    def touch(self) -> None:
        self._loop.run(self._aio.touch())

    def fail(self, error: Any) -> None:
        self._loop.run(self._aio.fail(error))

    def reply(self, body: Any, **kw: Any) -> None:
        self._loop.run(self._aio.reply(body, **kw))


class BDeadLetters(_Wrapped):
    _aio: aio.DeadLetters

    def __init__(self, loop: Loop, dead: aio.DeadLetters) -> None:
        self._loop, self._aio = loop, dead

    def list(self, limit: int = 100) -> Any:
        return self._loop.run(self._aio.list(limit))

    def replay(self, limit: int | None = None, ids: set[str] | None = None) -> int:
        return self._loop.run(self._aio.replay(limit, ids))

    def purge(self) -> int:
        return self._loop.run(self._aio.purge())


class BWorker(_Wrapped):
    """The aio Worker with the test's plain handler made ``async def`` (run on a thread, given a
    bridged message), so the async-handler path is the one under test."""

    def __init__(self, loop: Loop, url: Any, destination: Any, handler: Callable[[Any], object], **kw: Any) -> None:
        async def handle(m: aio.Message) -> object:
            return await asyncio.to_thread(handler, BMessage(loop, m))

        self._loop, self._aio = loop, aio.Worker(url, destination, handle, **kw)

    def run(self) -> int:
        code: int = self._loop.run(self._aio.run())
        return code

    def stop(self) -> None:
        self._loop.loop.call_soon_threadsafe(self._aio.stop)
