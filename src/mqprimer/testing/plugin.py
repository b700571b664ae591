"""pytest plugin: ``--mq-url`` options and the fixtures the conformance suite and the
reliability battery (:mod:`mqprimer.testing.battery`) use."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import mqprimer

from .control import BrokerControl, Figures, brokerless

pytest_plugins = ["mqprimer.testing._aio_bridge"]  # --mq-aio: the same cases through mqprimer.aio

_FIGURES = pytest.StashKey[Figures]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mqprimer")
    group.addoption(
        "--mq-url", action="append", default=[], dest="mq_url",
        help="backend URL to run the conformance suite on ([id=]url, repeatable)",
    )
    group.addoption(
        "--mq-battery", action="append", default=[], dest="mq_battery",
        help="backend URL to run the reliability battery on ([id=]url, repeatable; default: the --mq-url ones)",
    )
    group.addoption(
        "--mq-figures", default=None, dest="mq_figures",
        help="JSON file the battery merges its figures into (default: .run/reliability.json under the rootdir)",
    )


def _split(spec: str) -> tuple[str, str]:
    head, sep, rest = spec.partition("=")
    if sep and "://" not in head:
        return head, rest
    return spec.split("://", 1)[0], spec


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    from ._aio_bridge import api_params  # not at import: pytest_plugins rewrites its asserts first

    if "mq_url" in metafunc.fixturenames:
        specs = [_split(s) for s in metafunc.config.getoption("mq_url")]
        if not specs:
            specs = [("memory", "memory://conformance")]
        metafunc.parametrize("mq_url", api_params(metafunc.config, specs, lambda i, u: u), scope="session")
    if "mq_target" in metafunc.fixturenames:
        config = metafunc.config
        targets = [_split(s) for s in config.getoption("mq_battery") or config.getoption("mq_url")]
        if not targets:
            targets = [("memory", "memory://battery")]
        metafunc.parametrize("mq_target", api_params(config, targets, lambda i, u: (i, u)), scope="session")


def pytest_configure(config: pytest.Config) -> None:
    # the battery's broker faults carry it: a runner can keep them apart from tests that use the
    # same broker (tests/conftest.py names the broker of each mq_target; scripts/test runs them last)
    config.addinivalue_line("markers", "disruptive(*brokers): kills, freezes or restarts a broker "
                            "(default: the broker of the test's mq_target)")
    path = config.getoption("mq_figures", None)
    config.stash[_FIGURES] = Figures(Path(path) if path else config.rootpath / ".run" / "reliability.json")


def pytest_sessionfinish(session: pytest.Session) -> None:
    figures = session.config.stash.get(_FIGURES, None)
    if figures is not None:
        figures.write()


@pytest.fixture
def mq_figures(request: pytest.FixtureRequest) -> Figures:
    """Where battery tests record their figures (written when the session ends)."""
    return request.config.stash[_FIGURES]


@pytest.fixture
def mq_control(mq_target: tuple[str, str]) -> BrokerControl:
    """The broker control of the backend under test. Override this fixture in your conftest.py
    to return a :class:`~mqprimer.testing.control.BrokerControl` that can kill, start, freeze
    and thaw your broker; without one the battery fails for a networked backend."""
    _, url = mq_target
    control = brokerless(url)
    if control is None:
        pytest.fail(f"no broker control for {url.split('://')[0]}://: the reliability battery needs one "
                    "(override the mq_control fixture; see mqprimer.testing.battery)")
    return control


@pytest.fixture
def conn(mq_url: str) -> Iterator[mqprimer.Connection]:
    """A connection to the backend under test."""
    c = mqprimer.connect(mq_url)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def dest() -> str:
    """A queue name no other test uses (brokers keep state between tests)."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def topic_root() -> str:
    return f"t{uuid.uuid4().hex[:12]}"
