"""Test configuration: which backends the conformance suite runs on.

``scripts/brokers up`` writes ``.run/brokers/urls`` (``name url`` per line) and
``scripts/test`` exports ``MQPRIMER_EXPECT_BROKERS``. With ``CI=true`` a broker that is
expected but has no URL, or cannot be reached, fails the run; it is never skipped.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqprimer.testing.control import BrokerControl, ScriptedControl, brokerless

pytest_plugins = ["mqprimer.testing.plugin"]

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RUN = Path(os.environ.get("MQPRIMER_RUN_DIR") or ROOT / ".run" / "brokers")  # scripts/brokers' runtime dir


def _url_lines() -> list[list[str]]:
    path = Path(os.environ.get("MQPRIMER_BROKERS_FILE", ROOT / ".run" / "brokers" / "urls"))
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def broker_urls() -> dict[str, str]:
    """URL id (e.g. ``stomp-activemq``) -> URL, for every broker scripts/brokers started."""
    return {parts[0]: parts[1] for parts in _url_lines()}


def brokers_providing() -> dict[str, str]:
    """URL id -> the scripts/brokers.d broker that published it (e.g. ``activemq``)."""
    return {parts[0]: parts[2] for parts in _url_lines() if len(parts) > 2}


def expected_brokers() -> list[str]:
    return os.environ.get("MQPRIMER_EXPECT_BROKERS", "").split()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "disruptive(*brokers): kills, freezes or restarts the named scripts/brokers broker(s); "
        "scripts/test runs it in its serial-per-broker phase (see DISRUPTIVE below)")
    if not config.getoption("mq_url"):
        tmp = tempfile.mkdtemp(prefix="mqprimer-conformance-")
        specs = ["memory=memory://conformance", f"sqlite=sqlite:///{tmp}/conformance.db"]
        specs += [f"{name}={url}" for name, url in broker_urls().items()]
        specs += [f"zmq-tcp=zmq+tcp://127.0.0.1:{free_port_pair()}", f"zmq-ipc=zmq+ipc://{tmp}/zmq.sock",
                  f"zmq-ack=zmq+tcp://127.0.0.1:{free_port_pair()}?ack=1"]
        config.option.mq_url = specs
    if not config.getoption("mq_battery"):
        # the reliability battery: every backend once; the TLS variants of a URL reach the same
        # broker through the same driver (the conformance suite runs on them)
        tmp = tempfile.mkdtemp(prefix="mqprimer-battery-")
        specs = ["memory=memory://battery", f"sqlite=sqlite:///{tmp}/battery.db"]
        specs += [f"{name}={url}" for name, url in broker_urls().items() if not _is_tls_twin(name, url)]
        # zeromq: plain (at-most-once) and acknowledged (?ack=1; a short lease keeps the run short)
        specs += [f"zeromq=zmq+tcp://127.0.0.1:{free_port_pair()}",
                  f"zeromq-ack=zmq+tcp://127.0.0.1:{free_port_pair()}?ack=1&lease=3"]
        config.option.mq_battery = specs


_HANDED_OUT: set[int] = set()  # ports free_port_pair() gave this process: never twice


def free_port_pair() -> int:
    """A loopback port P with P+1 free too (zmq+tcp:// uses P for queues, P+1 for topics).

    Taken below the kernel's ephemeral range, in a band of its own per xdist worker: the
    conformance target's P+1 is bound only when a topic test runs, and an ephemeral P+1 was
    meanwhile the local port of some outbound connection in a CI run (EADDRINUSE)."""
    import random
    import socket

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    low = 20000 + (int(worker) % 6 if worker.isdigit() else 0) * 1500  # up to 28999: below our brokers' ports
    if low + 1500 >= ephemeral_low:
        raise RuntimeError(f"the ephemeral port range starts at {ephemeral_low}: no room below it for zmq test ports")
    for _ in range(200):
        port = random.randrange(low, low + 1499)
        if port in _HANDED_OUT or port + 1 in _HANDED_OUT:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        _HANDED_OUT.update((port, port + 1))
        return port
    raise RuntimeError(f"no two consecutive free loopback ports in {low}-{low + 1499}")


def _is_tls_twin(url_id: str, url: str) -> bool:
    """amqps://, stomp+ssl://, the id ``xmpps`` beside ``xmpp``...: the TLS twin of a URL the
    battery already runs (same broker, same driver)."""
    from mqprimer.registry import BUILTIN

    scheme = url.split("://", 1)[0]
    return (scheme.endswith(("+ssl", "+tls")) or (scheme.endswith("s") and scheme[:-1] in BUILTIN)
            or (url_id.endswith("s") and url_id[:-1] in broker_urls()))


@pytest.fixture
def mq_control(mq_target: tuple[str, str]) -> BrokerControl:
    """The battery's broker control: ``scripts/brokers kill|up|freeze|thaw NAME`` for the broker
    that published the URL; memory:// and sqlite:// have none (the battery records why)."""
    url_id, url = mq_target
    control = brokerless(url)
    if control is None:
        broker = brokers_providing().get(url_id)
        if broker is None:
            pytest.fail(f"no broker of scripts/brokers published the URL id {url_id!r}")
        # beanstalk-ha, gearman-ha: host lists of the broker(s) behind another id
        twin = url_id[:-3] if url_id.endswith("-ha") and url_id[:-3] in broker_urls() else ""
        control = ScriptedControl(url, broker, [str(ROOT / "scripts" / "brokers")], same_as=twin)
    return control


def driver_sub(c: Any) -> Any:
    """The driver's Subscription under a one-destination consumer (tests that watch a driver)."""
    s = c._single  # type: ignore[attr-defined]
    assert s is not None and s.sub is not None
    return s.sub


def need_broker(name: str) -> str:
    """The URL of a started broker; in CI a missing one is a failure, elsewhere a skip."""
    url = broker_urls().get(name)
    if url is None:
        # `name` is a URL id (amqp, beanstalk-ha); the run expects brokers (rabbitmq, beanstalkd)
        broker = brokers_providing().get(name) or harness_url_ids().get(name)
        msg = (f"no {name!r} URL: the broker providing it ({broker or 'unknown'}) is not running "
               "(start them with: scripts/brokers up)")
        if CI or broker in expected_brokers():
            pytest.fail(msg)
        pytest.skip(msg)
    return url


def harness_url_ids() -> dict[str, str]:
    """URL id -> broker, as the harness declares them (``add_url ID ...`` in scripts/brokers.d/BROKER.sh):
    which broker should have published a URL that is missing."""
    out: dict[str, str] = {}
    for script in sorted((ROOT / "scripts" / "brokers.d").glob("*.sh")):
        for m in re.finditer(r"^\s*add_url\s+([\w.+-]+)", script.read_text(), re.MULTILINE):
            out.setdefault(m.group(1), script.stem)
    return out




# Open defects the battery found, kept visible: the test runs and its figures go to
# docs/reliability.md; a pass shows as XPASS. Each names where it is written up.
KNOWN_DEFECTS: dict[str, str] = {}


# -- tests that disturb a shared broker ------------------------------------------------------------
# THE RULE: a test that SIGKILLs, freezes (SIGSTOP), stops, restarts or otherwise blocks a broker of
# scripts/brokers carries ``@pytest.mark.disruptive("NAME", ...)`` with the scripts/brokers.d name(s)
# of what it disturbs (rabbitmq, activemq, beanstalkd, gearmand, prosody). scripts/test runs the suite
# in two phases: every other test in parallel (pytest-xdist), then the disruptive ones, those of one
# broker one after another and never beside a test that uses that broker. During a scripts/test run,
# scripts/brokers refuses kill|freeze|thaw|down of a broker the running test did not declare, so a
# test that forgets the marker fails at once, instead of making other tests fail at random.
# (A test naming two brokers gets a worker of its own, which may run beside either broker's other
# fault tests: keep each fault test to one broker.)
# The battery's broker faults are marked in mqprimer.testing.battery (its broker is that of its
# mq_target); tests of files owned elsewhere are listed here until they carry the marker themselves.
DISRUPTIVE: dict[str, tuple[str, ...]] = {
    "test_beanstalk.py::test_job_restored_without_its_crlf_is_dead_lettered_and_the_consumer_goes_on":
        ("beanstalkd",),
    "test_gearman.py::test_server_sigkill_keeps_every_created_job": ("gearmand",),
    "test_gearman.py::test_server_down_at_connect_and_mid_stream_then_recovery": ("gearmand",),
    "test_gearman.py::test_two_servers_fail_over_on_send_and_consume_from_both": ("gearmand",),
    "test_xmpp.py::test_sigkill_and_restart_every_confirmed_item_reaches_a_named_subscription": ("prosody",),
}
_DISRUPTS = pytest.StashKey[tuple[str, ...]]()


def disrupted_brokers(item: pytest.Item) -> tuple[str, ...] | None:
    """The brokers ``item`` disturbs; ``None`` if it disturbs none, ``()`` if it is marked but
    names none (an error, reported when it runs)."""
    mark = item.get_closest_marker("disruptive")
    listed = DISRUPTIVE.get(f"{item.path.name}::{getattr(item, 'originalname', item.name)}")
    if mark is None and listed is None:
        return None
    names = set(mark.args if mark else ()) | set(listed or ())
    callspec = getattr(item, "callspec", None)
    if not names and callspec is not None and "mq_target" in callspec.params:
        broker = brokers_providing().get(callspec.params["mq_target"][0])
        if broker is None:  # memory, sqlite, zeromq: no broker, the fault is N/A there (a quick skip)
            return ("no-broker",)
        names = {broker}
    return tuple(sorted(names))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks (--dist loadgroup)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # (an xdist worker has dist "no" and loadgroup True; the controller, dist "loadgroup")
    grouped = config.pluginmanager.hasplugin("xdist") and (
        getattr(config.option, "loadgroup", False) or config.getoption("dist", "no") == "loadgroup")
    for item in items:
        reason = KNOWN_DEFECTS.get(item.name)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
        brokers = disrupted_brokers(item)
        if brokers is not None:
            item.stash[_DISRUPTS] = brokers
            if item.get_closest_marker("disruptive") is None:
                item.add_marker(pytest.mark.disruptive(*brokers))
        if not grouped:
            continue
        group = ""
        if brokers:  # one worker per broker: its faults run one after another
            group = "disrupts-" + "+".join(brokers)
        elif any(d.scope in ("module", "class") for defs in item._fixtureinfo.name2fixturedefs.values()
                 for d in defs):
            # a module-scoped fixture (one supervisord, say) is set up once: keep its tests together
            group = item.nodeid.split("::")[0]
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
            _group_nodeid(item, group)


def _group_nodeid(item: pytest.Item, group: str) -> None:
    """What ``--dist loadgroup`` does to a grouped item (the ``@group`` suffix its scheduler
    reads): xdist 3.8 sets ``item._nodeid``, which pytest 9 no longer reads (``item._id``)."""
    if item.nodeid.endswith(f"@{group}") or not hasattr(item, "_id"):
        return  # done by xdist itself (an older pytest), or a pytest this does not know
    from _pytest.nodeid import NodeId

    item._id = NodeId.parse(f"{item.nodeid}@{group}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    brokers = item.stash.get(_DISRUPTS, None)
    if brokers == ():
        pytest.fail("pytest.mark.disruptive needs the scripts/brokers name(s) of the broker(s) the test "
                    "disturbs, e.g. @pytest.mark.disruptive('rabbitmq')", pytrace=False)
    # scripts/brokers (under scripts/test) refuses kill|freeze|thaw|down of any other broker
    os.environ["MQPRIMER_MAY_DISRUPT"] = " ".join(brokers or ())


@pytest.hookimpl(trylast=True)  # after the fixtures' teardown, which may thaw or restart the broker
def pytest_runtest_teardown(item: pytest.Item) -> None:
    os.environ["MQPRIMER_MAY_DISRUPT"] = ""


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every call the asyncio twin hands to one of its pool threads (the function), from now on:
    what the twin's loop-side paths (Capabilities.nowait, the asyncio SPI) must leave empty."""
    from mqprimer.aio._runner import Runner

    seen: list[Any] = []
    put = Runner._put

    def counting(self: Runner, job: Any) -> None:
        seen.append(job.fn)
        put(self, job)

    monkeypatch.setattr(Runner, "_put", counting)
    return seen


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: an ipc address must fit in 107 bytes, and pytest's
    tmp_path plus a reply path's suffix can pass that (seen: .../pytest-388/popen-gw0/...)."""
    with tempfile.TemporaryDirectory(prefix="mqz-", dir="/tmp") as d:
        yield Path(d)
