"""The conformance suite, shipped so that third-party backends can run it too.

In your test directory::

    # conftest.py
    pytest_plugins = ["mqprimer.testing.plugin"]

    # test_conformance.py
    from mqprimer.testing.conformance import *  # noqa: F401,F403

then ``pytest --mq-url=mybroker://127.0.0.1:1234/`` (repeatable; ``name=url`` sets the test id).
Every test is driven by the backend's :class:`~mqprimer.Capabilities`: a declared
feature is exercised against the broker, an undeclared one must raise
:class:`~mqprimer.UnsupportedError`.
"""

from .helpers import collect, unreachable_url, wait_until

__all__ = ["collect", "unreachable_url", "wait_until"]
