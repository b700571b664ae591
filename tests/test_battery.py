"""The shipped reliability battery, on memory://, sqlite:// and every broker scripts/brokers started.

The broker control comes from tests/conftest.py (``mq_control``: scripts/brokers kill|up|freeze|thaw).
"""

from pathlib import Path

import pytest

from mqprimer import URL, ConfigurationError
from mqprimer.registry import get
from mqprimer.testing.battery import *  # noqa: F401,F403


@pytest.mark.parametrize("scheme", ["stomp", "beanstalk", "gearman"])
@pytest.mark.parametrize("bad", ["0", "-1", "soon", "nan", "1e9"])
def test_io_timeout_is_validated(scheme: str, bad: str) -> None:
    """The frozen-broker fault shortens ``io_timeout``: a bad value is refused up front, by name."""
    with pytest.raises(ConfigurationError, match=f"io_timeout must be a number of seconds.*{bad}"):
        get(scheme)(URL.parse(f"{scheme}://127.0.0.1:1/?io_timeout={bad}"))
    backend = get(scheme)(URL.parse(f"{scheme}://127.0.0.1:1/?io_timeout=2.5"))
    assert backend.io_timeout == 2.5  # type: ignore[attr-defined]


def test_resend_duplicates_are_allowed_only_for_the_calls_under_way_at_the_fault() -> None:
    """On xmpp (documented: a re-published item is notified again) a duplicate of a message whose
    send call spanned the fault is accepted; any other duplicate still fails the battery."""
    from mqprimer.testing._stream import Stream
    from mqprimer.testing._target import Target, _assert_guarantee
    from mqprimer.testing.control import BrokerControl, Figures

    stream = Stream("memory://x", "q", 0)
    stream.fault_at = 100.0
    stream.calls = [(99.0, 99.5, ["early"]), (99.9, 103.0, ["spanning"]), (101.0, 101.1, ["late"])]
    caps = get("xmpp").capabilities
    target = Target("xmpp", BrokerControl("xmpp://u:p@127.0.0.1:1/pubsub.localhost?domain=localhost"), caps,
                    Figures(Path("/nonexistent")), "q")
    fig = {"lost": 0, "duplicated": 1}
    stream.received = ["early", "spanning", "spanning", "late"]
    _assert_guarantee(target, fig, broker_died=False, stream=stream)
    for other in ("early", "late"):
        stream.received = ["early", "spanning", "late", other]
        with pytest.raises(AssertionError, match="not in a send call under way at the fault"):
            _assert_guarantee(target, fig, broker_died=False, stream=stream)
    target.control.resend_duplicates = ""  # a backend whose docs promise no duplicates at all
    stream.received = ["early", "spanning", "spanning", "late"]
    with pytest.raises(AssertionError, match="duplicates on an at-most-once backend"):
        _assert_guarantee(target, fig, broker_died=False, stream=stream)


def test_a_stream_stops_waiting_for_lost_messages_once_the_broker_says_it_holds_none() -> None:
    """Stream.finish: confirmed messages that never came end the wait when ``drained`` says the
    broker holds nothing more (after ``quiet`` s with no delivery); without it, the full timeout."""
    import time

    from mqprimer.testing._stream import Stream

    for drained, least, most in ((lambda: True, 0.5, 4.0), (lambda: False, 6.0, 12.0), (None, 6.0, 12.0)):
        stream = Stream("memory://x", "q", 0)
        stream._produced.set()  # the producer is done; "lost" was confirmed and never delivered
        stream.confirmed, stream.received = ["got", "lost"], ["got"]
        start = time.monotonic()
        stream.finish(timeout=6, settle=0.1, drained=drained, quiet=0.5)
        took = time.monotonic() - start
        assert least <= took <= most, f"drained={drained}: finish took {took:.1f}s"
        assert stream.figures()["lost"] == 1


def test_figures_of_several_processes_are_all_kept(tmp_path: Path) -> None:
    """xdist workers and scripts/test's two phases each merge their rows into one file."""
    import json
    import subprocess
    import sys

    script = """
import sys
from pathlib import Path
from mqprimer.testing.control import Figures
f = Figures(Path(sys.argv[1]))
for i in range(15):
    f.record(f"b{sys.argv[2]}", f"fault {i}", sent=i)
    f.write()
"""
    path = tmp_path / "reliability.json"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(n)]) for n in range(6)]
    assert [p.wait(60) for p in procs] == [0] * 6
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == 6 * 15, f"{6 * 15 - len(rows)} rows written over by another process"
