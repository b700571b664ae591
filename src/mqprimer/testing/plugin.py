"""pytest plugin: ``--mq-url`` options and the fixtures the conformance suite uses."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

import mqprimer


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mqprimer")
    group.addoption(
        "--mq-url", action="append", default=[], dest="mq_url",
        help="backend URL to run the conformance suite on ([id=]url, repeatable)",
    )


def _split(spec: str) -> tuple[str, str]:
    head, sep, rest = spec.partition("=")
    if sep and "://" not in head:
        return head, rest
    return spec.split("://", 1)[0], spec


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mq_url" in metafunc.fixturenames:
        specs = [_split(s) for s in metafunc.config.getoption("mq_url")]
        if not specs:
            specs = [("memory", "memory://conformance")]
        metafunc.parametrize("mq_url", [u for _, u in specs], ids=[i for i, _ in specs], scope="session")


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
