"""The broker harness itself: every broker the run expects is up and listed."""

from __future__ import annotations

from conftest import broker_urls, expected_brokers


def test_every_expected_broker_has_a_url() -> None:
    missing = [b for b in expected_brokers() if not any(n == b or n.startswith(b + "-") for n in broker_urls())]
    assert not missing, f"scripts/brokers did not report a URL for: {missing}"
