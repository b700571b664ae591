"""The broker harness itself: every broker the run expects is up and published its URLs."""

from __future__ import annotations

import os

from conftest import brokers_providing, expected_brokers


def test_every_expected_broker_published_a_url() -> None:
    provided = set(brokers_providing().values())
    missing = [b for b in expected_brokers() if b not in provided]
    assert not missing, f"scripts/brokers did not publish a URL for: {missing}"


def test_ci_expects_every_broker() -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        assert expected_brokers(), "CI=true but MQPRIMER_EXPECT_BROKERS is empty: run the suite through scripts/test"
