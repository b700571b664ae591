"""The shipped reliability battery, on memory://, sqlite:// and every broker scripts/brokers started.

The broker control comes from tests/conftest.py (``mq_control``: scripts/brokers kill|up|freeze|thaw).
"""

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
