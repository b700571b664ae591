"""The shipped conformance suite, on memory://, sqlite:// and every broker scripts/brokers started."""

from mqprimer.testing.conformance import *  # noqa: F401,F403
