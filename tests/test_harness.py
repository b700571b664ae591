"""The broker harness itself: every broker the run expects is up and published its URLs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
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


# -- the two phases of scripts/test (tests/conftest.py: pytest.mark.disruptive) -----------------------
def _harness(*args: str, run_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(conftest.ROOT / "scripts" / "brokers"), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "MQPRIMER_RUN_DIR": str(run_dir), **env})


def test_under_scripts_test_a_broker_the_running_test_did_not_declare_is_not_disturbed(tmp_path: Path) -> None:
    """The guard that keeps an unmarked fault test from failing the parallel phase at random.
    (An empty runtime dir: were the guard broken, there would be no broker there to hurt.)"""
    for action in ("kill", "freeze", "thaw", "down", "clean"):
        r = _harness(action, "gearmand", run_dir=tmp_path, MQPRIMER_DISRUPT_GUARD="1",
                     MQPRIMER_MAY_DISRUPT="beanstalkd")
        assert r.returncode != 0, f"{action} of an undeclared broker went ahead"
        assert f"refusing to {action} gearmand" in r.stderr and "@pytest.mark.disruptive(\"gearmand\")" in r.stderr
    # the declared broker passes the guard (and then finds nothing to kill in the empty dir)
    r = _harness("kill", "gearmand", run_dir=tmp_path, MQPRIMER_DISRUPT_GUARD="1", MQPRIMER_MAY_DISRUPT="gearmand")
    assert r.returncode == 0 and "refusing" not in r.stderr, r.stderr
    assert os.environ.get("MQPRIMER_MAY_DISRUPT") == "", "a test that declares nothing may disturb nothing"


def test_fault_tests_are_in_the_disruptive_phase() -> None:
    """Each broker's SIGKILL and freeze cases of the battery, and the listed fault tests of other files,
    are what scripts/test's second phase selects; a test that kills nothing is not."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                        "-m", "disruptive", "tests/test_battery.py", "tests/test_gearman.py", "tests/test_api.py"],
                       cwd=conftest.ROOT, capture_output=True, text=True, timeout=120)
    picked = set(r.stdout.split())
    for url_id in conftest.brokers_providing():
        if not conftest._is_tls_twin(url_id, conftest.broker_urls()[url_id]):
            for test in ("test_broker_sigkill_mid_stream", "test_frozen_broker"):
                assert f"tests/test_battery.py::{test}[{url_id}]" in picked, (url_id, r.stdout[-2000:])
    assert "tests/test_gearman.py::test_server_sigkill_keeps_every_created_job" in picked
    assert not any("test_api.py" in p or "test_cut_connection" in p for p in picked), "a test that kills nothing"



def test_under_xdist_a_brokers_fault_tests_share_one_worker() -> None:
    """--dist loadgroup sends a group to one worker; the group is the nodeid's @suffix (set by
    tests/conftest.py: xdist 3.8 sets it where pytest 9 no longer reads it)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-n", "2", "--dist",
                        "loadgroup", "-m", "disruptive", "-k", "memory or sqlite", "tests/test_battery.py"],
                       cwd=conftest.ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MQPRIMER_AIO="off"))  # scripts/test's aio twins would double the count
    ran = [line for line in r.stdout.splitlines() if "SKIPPED" in line and "test_battery.py::" in line]
    assert len(ran) == 4 and all(line.split()[0] == ran[0].split()[0] for line in ran), r.stdout[-3000:]
    assert all("@disrupts-no-broker" in line for line in ran), r.stdout[-3000:]


@pytest.fixture
def thaws_in_teardown(tmp_path: Path) -> Iterator[None]:
    """A fixture that, like a broker-restoring one, calls the harness on its way out (an empty
    runtime dir: there is no broker there to thaw)."""
    yield
    r = _harness("thaw", "gearmand", run_dir=tmp_path, MQPRIMER_DISRUPT_GUARD="1")
    assert "refusing" not in r.stderr, f"the declared broker was refused in the fixture's teardown: {r.stderr}"


@pytest.mark.disruptive("gearmand")
def test_a_fixture_teardown_may_still_disturb_the_declared_broker(thaws_in_teardown: None) -> None:
    assert os.environ.get("MQPRIMER_MAY_DISRUPT") == "gearmand"
