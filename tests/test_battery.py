"""The shipped reliability battery, on memory://, sqlite:// and every broker scripts/brokers started.

The broker control comes from tests/conftest.py (``mq_control``: scripts/brokers kill|up|freeze|thaw).
"""

from mqprimer.testing.battery import *  # noqa: F401,F403
