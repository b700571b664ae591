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
