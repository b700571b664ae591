"""Backends by URL scheme: a built-in table, then the ``mqprimer.backends`` entry points.

A third-party package adds a backend with, in its pyproject.toml::

    [project.entry-points."mqprimer.backends"]
    redis = "mqprimer_redis:RedisBackend"
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from .backend import Backend
from .errors import BackendNotInstalled, ConfigurationError, UnknownScheme


@dataclass(frozen=True)
class BackendSpec:
    scheme: str
    target: str  # "module:Class"
    extra: str | None = None  # the pip extra that installs its client library
    library: str | None = None  # the client library's distribution name


BUILTIN: dict[str, BackendSpec] = {
    s.scheme: s
    for s in (
        BackendSpec("memory", "mqprimer.backends.memory:MemoryBackend"),
        BackendSpec("sqlite", "mqprimer.backends.sqlite:SqliteBackend"),
        BackendSpec("amqp", "mqprimer.backends.amqp:AmqpBackend", "amqp", "pika"),
        BackendSpec("amqps", "mqprimer.backends.amqp:AmqpBackend", "amqp", "pika"),
        BackendSpec("stomp", "mqprimer.backends.stomp:StompBackend", "stomp", "stomp.py"),
        BackendSpec("stomp+ssl", "mqprimer.backends.stomp:StompBackend", "stomp", "stomp.py"),
        BackendSpec("beanstalk", "mqprimer.backends.beanstalk:BeanstalkBackend", "beanstalk", "greenstalk"),
        BackendSpec("gearman", "mqprimer.backends.gearman:GearmanBackend"),  # speaks the protocol itself (stdlib)
        BackendSpec("xmpp", "mqprimer.backends.xmpp:XmppBackend", "xmpp", "slixmpp"),
        BackendSpec("zmq+tcp", "mqprimer.backends.zeromq:ZmqBackend", "zmq", "pyzmq"),
        BackendSpec("zmq+ipc", "mqprimer.backends.zeromq:ZmqBackend", "zmq", "pyzmq"),
    )
}

_cache: dict[str, type[Backend]] = {}


def schemes() -> list[str]:
    """Every scheme known: built-in and installed entry points."""
    return sorted(set(BUILTIN) | {ep.name for ep in entry_points(group="mqprimer.backends")})


def get(scheme: str) -> type[Backend]:
    """The backend class for ``scheme``; clear errors for unknown or not installed."""
    scheme = scheme.lower()
    if scheme in _cache:
        return _cache[scheme]
    spec = BUILTIN.get(scheme)
    if spec is not None:
        cls = _load(spec)
    else:
        eps = [ep for ep in entry_points(group="mqprimer.backends") if ep.name == scheme]
        if not eps:
            close = difflib.get_close_matches(scheme, schemes(), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c + '://') for c in close)}?" if close else ""
            raise UnknownScheme(
                f"no mqprimer backend for URL scheme {scheme!r}.{hint} "
                f"Known schemes: {', '.join(schemes())}."
            )
        cls = eps[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigurationError(f"backend for {scheme!r} is not a mqprimer.backend.Backend subclass")
    _cache[scheme] = cls
    return cls


def _load(spec: BackendSpec) -> type[Backend]:
    module_name, _, attr = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing == module_name:
            raise BackendNotInstalled(
                f"the {spec.scheme}:// backend is not available in this version of mqprimer"
            ) from None
        if spec.extra is None or missing.startswith("mqprimer"):
            raise
        raise BackendNotInstalled(
            f"the {spec.scheme}:// backend needs the {spec.library} client library, which is not "
            f"installed: pip install 'mqprimer[{spec.extra}]'"
        ) from None
    cls: type[Backend] = getattr(module, attr)
    return cls
