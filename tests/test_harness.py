"""The broker harness itself: every broker the run expects is up and published its URLs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import conftest
from conftest import brokers_providing, expected_brokers


def test_every_expected_broker_published_a_url() -> None:
    provided = set(brokers_providing().values())
    missing = [b for b in expected_brokers() if b not in provided]
    assert not missing, f"scripts/brokers did not publish a URL for: {missing}"


def test_ci_expects_every_broker() -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        assert expected_brokers(), "CI=true but MQPRIMER_EXPECT_BROKERS is empty: run the suite through scripts/test"


def test_a_missing_url_of_an_expected_broker_fails_even_outside_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """need_broker takes URL ids (amqp); the run expects brokers (rabbitmq): the two are matched."""
    empty = tmp_path / "urls"
    empty.write_text("")
    monkeypatch.setenv("MQPRIMER_BROKERS_FILE", str(empty))
    monkeypatch.setenv("MQPRIMER_EXPECT_BROKERS", "rabbitmq")
    monkeypatch.setattr(conftest, "CI", False)
    try:
        conftest.need_broker("amqp")
    except pytest.skip.Exception:
        raise AssertionError("the missing URL of an expected broker was skipped, not failed") from None
    except pytest.fail.Exception as exc:
        assert "rabbitmq" in str(exc)
    else:
        raise AssertionError("need_broker returned a URL that is not there")
    with pytest.raises(pytest.skip.Exception):
        conftest.need_broker("beanstalk")  # beanstalkd is not expected by this run
