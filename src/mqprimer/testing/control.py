"""What the reliability battery needs from a backend's test setup, and where its figures go.

A :class:`BrokerControl` kills, starts, freezes and thaws the broker behind one URL.
:class:`ScriptedControl` does it through a command line such as the project's
``scripts/brokers kill|up|freeze|thaw NAME``; a third-party backend provides its own
control by overriding the ``mq_control`` fixture (see :mod:`mqprimer.testing.battery`).
A backend with no broker process (memory://, sqlite://) gets a control whose operations
raise :class:`NotApplicable` with the reason, which the battery writes into its figures.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..url import URL
from .proxy import Proxy

#: URL options that make a dead or hung link show quickly, per scheme (added for the
#: frozen-broker fault only; a backend without such an option is measured as it is)
FAST_FAILURE: dict[str, dict[str, str]] = {
    "amqp": {"heartbeat": "1", "connect_timeout": "2"},
    "amqps": {"heartbeat": "1", "connect_timeout": "2"},
    "stomp": {"heartbeat": "0.5", "io_timeout": "1"},
    "stomp+ssl": {"heartbeat": "0.5", "io_timeout": "1"},
    "beanstalk": {"io_timeout": "1"},
    "gearman": {"io_timeout": "1"},
    "xmpp": {"timeout": "1"},  # keepalive ping every 1 s, 1 s to answer; session start within 1 s
}
#: the documented bound (seconds) within which a frozen broker must surface as an error
#: with the options above (pika: 2 x (heartbeat + 5 s) to notice, then reconnect attempts of
#: connect_timeout each; STOMP: heart-beats notice in ~2.5 s, a receipt or a CONNECT waits
#: io_timeout; beanstalk and gearman: an unanswered command or reserve waits io_timeout;
#: each then spends up to reconnect_timeout=3 s in reconnect attempts of io_timeout each)
FROZEN_LIMIT: dict[str, float] = {"amqp": 30.0, "amqps": 30.0, "stomp": 15.0, "stomp+ssl": 15.0,
                                  "beanstalk": 15.0, "gearman": 15.0, "xmpp": 20.0}
#: at-most-once backends whose documentation says a message the portable layer publishes
#: again (after a lost answer) reaches a subscriber again: the battery allows duplicates of
#: the send calls under way at a fault there, and only of those
RESEND_DUPLICATES: dict[str, str] = {
    "xmpp": "docs/backend-xmpp.md: the item id is the message id, so a re-published item replaces "
            "itself on the node, but its subscribers are notified again",
}


class NotApplicable(Exception):
    """A fault that cannot happen to this backend; the message says why (it goes into the figures)."""


class BrokerControl:
    """The broker behind ``url``, as the battery drives it.

    Subclasses implement :meth:`kill`, :meth:`start`, :meth:`freeze` and :meth:`thaw` for
    a broker process; the defaults raise :class:`NotApplicable` with :attr:`no_broker`.
    ``start`` must be idempotent and return only once the broker answers again.
    """

    def __init__(self, url: str, *, no_broker: str = "", fast_failure: Mapping[str, str] | None = None,
                 frozen_limit: float | None = None, extra_params: Mapping[str, str] | None = None,
                 same_as: str = "") -> None:
        u = URL.parse(url)
        if extra_params:
            u = u.with_query(**extra_params)
        self.url = u.render(hide_password=False)
        self.scheme = u.scheme
        #: why this backend has no broker process to kill or freeze ("" if it has one)
        self.no_broker = no_broker
        self.fast_failure = dict(FAST_FAILURE.get(u.scheme, {}) if fast_failure is None else fast_failure)
        self.frozen_limit = frozen_limit or FROZEN_LIMIT.get(u.scheme, 30.0)
        #: why a re-sent message may be delivered twice on this at-most-once backend ("" if never)
        self.resend_duplicates = RESEND_DUPLICATES.get(u.scheme, "")
        #: the id of another battery target with the same broker and driver: this one (e.g. a
        #: host list) then runs only the faults a URL list changes (SIGKILL, failover), the
        #: others are recorded N/A with a pointer there, which keeps the suite's time down
        self.same_as = same_as

    @property
    def has_broker(self) -> bool:
        return not self.no_broker

    def kill(self) -> None:
        """SIGKILL the broker, keeping its data."""
        raise NotApplicable(self.no_broker or "this control cannot kill the broker")

    def start(self) -> None:
        """Start the broker (again) and return once it answers; nothing if it runs."""
        raise NotApplicable(self.no_broker or "this control cannot start the broker")

    def freeze(self) -> None:
        """SIGSTOP the broker: it holds its connections open and answers nothing."""
        raise NotApplicable(self.no_broker or "this control cannot freeze the broker")

    def thaw(self) -> None:
        raise NotApplicable(self.no_broker or "this control cannot thaw the broker")

    # -- URLs -----------------------------------------------------------------------
    def network_hosts(self) -> list[tuple[str, int]]:
        """The URL's (host, port) pairs; :class:`NotApplicable` without a network endpoint."""
        u = URL.parse(self.url)
        if self.no_broker or not u.hosts:
            raise NotApplicable(self.no_broker or f"{u.scheme}:// has no network endpoint")
        out = []
        for host, port in u.hosts:
            if port is None:
                raise NotApplicable(f"{u}: give the port explicitly so the battery can put a proxy in front")
            out.append((host, port))
        return out

    def via(self, proxies: Sequence[Proxy], url: str | None = None) -> str:
        """``url`` (default: this control's) with its hosts replaced by the proxies' ports, in order."""
        u = URL.parse(url or self.url)
        hosts = tuple(("127.0.0.1", p.port) for p in proxies)
        return URL(u.scheme, u.username, u.password, hosts, u.path, u.query).render(hide_password=False)

    def proxies(self, stack: ExitStack) -> list[Proxy]:
        """One proxy per host of the URL, closed with ``stack``."""
        return [stack.enter_context(Proxy(h)) for h in self.network_hosts()]

    def with_params(self, **params: str) -> str:
        return URL.parse(self.url).with_query(**params).render(hide_password=False)


class ScriptedControl(BrokerControl):
    """A broker driven by a harness command: ``[*command, "kill"|"up"|"freeze"|"thaw", broker]``."""

    def __init__(self, url: str, broker: str, command: Sequence[str], *, env: Mapping[str, str] | None = None,
                 **options: Any) -> None:
        super().__init__(url, **options)
        self.broker = broker
        self.command = list(command)
        self.env = {**os.environ, **(env or {})}

    def _run(self, action: str, timeout: float = 180) -> None:
        done = subprocess.run([*self.command, action, self.broker], env=self.env, timeout=timeout,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(self.command)} {action} {self.broker} failed: {done.stderr.strip()[-800:]}")

    def kill(self) -> None:
        self._run("kill")

    def start(self) -> None:
        self._run("up")

    def freeze(self) -> None:
        self._run("freeze", 30)

    def thaw(self) -> None:
        self._run("thaw", 30)


def brokerless(url: str) -> BrokerControl | None:
    """The control of a backend that runs inside the test process or a file, else ``None``."""
    scheme = URL.parse(url).scheme
    if scheme == "memory":
        return BrokerControl(url, no_broker="memory:// lives inside the process: no broker to kill, freeze or cut")
    if scheme == "sqlite":
        return BrokerControl(url, no_broker="sqlite:// is a file each process opens: no broker process or "
                             "connection (its writer is SIGKILLed instead)", extra_params={"visibility_timeout": "3"})
    from ..registry import get  # only here: most controls never need the backend class

    caps = get(scheme).capabilities
    if getattr(caps, "brokerless", False):  # e.g. ZeroMQ: peers talk to each other
        return BrokerControl(url, no_broker=f"{caps.name} has no broker: its peers connect to each other")
    return None


# -- figures -----------------------------------------------------------------------------
FIELDS = ("sent", "confirmed", "delivered", "lost", "duplicated", "recovery_s")


class Figures:
    """Per (backend, fault) results of one run; written as JSON for scripts/update-reliability."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def record(self, backend: str, fault: str, *, guarantee: str = "", wall_s: float | None = None,
               note: str = "", **numbers: float | int | None) -> None:
        unknown = set(numbers) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown figure(s) {sorted(unknown)}; known: {FIELDS}")
        row: dict[str, Any] = {"backend": backend, "fault": fault, "status": "measured", "guarantee": guarantee,
                               "note": note, "wall_s": None if wall_s is None else round(wall_s, 2)}
        row.update({k: (round(v, 2) if isinstance(v, float) else v) for k, v in numbers.items()})
        with self._lock:
            self.rows[(backend, fault)] = row

    def not_applicable(self, backend: str, fault: str, reason: str) -> None:
        with self._lock:
            self.rows[(backend, fault)] = {"backend": backend, "fault": fault, "status": "n/a", "note": reason}

    def write(self) -> None:
        """Merge into the file (a partial run updates its own rows, keeps the others)."""
        if not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # several pytest processes (xdist workers, scripts/test's two phases) each merge their own
        # rows: the read-merge-write is under a lock, so no process writes over another's rows
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old: list[dict[str, Any]] = []
            if self.path.exists():
                try:
                    old = json.loads(self.path.read_text())["rows"]
                except (ValueError, KeyError, TypeError):
                    old = []
            merged = {(r["backend"], r["fault"]): r for r in old}
            merged.update(self.rows)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "rows": sorted(merged.values(), key=lambda r: (r["backend"], r["fault"]))},
                                      indent=1))
            tmp.replace(self.path)
