"""Test configuration: which backends the conformance suite runs on.

``scripts/brokers up`` writes ``.run/brokers/urls`` (``name url`` per line) and
``scripts/test`` exports ``MQPRIMER_EXPECT_BROKERS``. With ``CI=true`` a broker that is
expected but has no URL, or cannot be reached, fails the run; it is never skipped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["mqprimer.testing.plugin"]

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def broker_urls() -> dict[str, str]:
    path = Path(os.environ.get("MQPRIMER_BROKERS_FILE", ROOT / ".run" / "brokers" / "urls"))
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, url = line.split(None, 1)
                out[name] = url.strip()
    return out


def expected_brokers() -> list[str]:
    return os.environ.get("MQPRIMER_EXPECT_BROKERS", "").split()


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("mq_url"):
        tmp = tempfile.mkdtemp(prefix="mqprimer-conformance-")
        specs = ["memory=memory://conformance", f"sqlite=sqlite:///{tmp}/conformance.db"]
        specs += [f"{name}={url}" for name, url in broker_urls().items()]
        config.option.mq_url = specs


def need_broker(name: str) -> str:
    """The URL of a started broker; in CI a missing one is a failure, elsewhere a skip."""
    url = broker_urls().get(name)
    if url is None:
        msg = f"broker {name!r} is not running: start it with scripts/brokers up {name.split('-')[0]}"
        if CI or name in expected_brokers():
            pytest.fail(msg)
        pytest.skip(msg)
    return url


