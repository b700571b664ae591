"""Whether a connection's reply path is still on the broker, where the broker can tell.

Used by the request/reply conformance test that nothing is left behind after close.
"""

from __future__ import annotations

import socket
import sqlite3

from ..url import URL


def reply_paths_left(url: str, address: str) -> bool | None:
    """``True`` if the reply path ``address`` still exists on the broker of ``url``,
    ``False`` if not, ``None`` where this cannot be seen (an empty sqlite reply queue is
    no row at all; brokers without a listing)."""
    u = URL.parse(url)
    if u.scheme == "memory":
        from ..backends.memory import _brokers

        broker = _brokers.get(u.host or "default")
        return broker is not None and address in broker.queues
    if u.scheme == "sqlite":
        path = u.path[1:] if u.path.startswith("/") else u.path
        with sqlite3.connect(path) as db:
            n = db.execute("SELECT count(*) FROM mq_messages WHERE queue = ? AND state < 2", (address,)).fetchone()[0]
        return True if n else None
    if u.scheme == "beanstalk":
        host, port = u.hosts[0]
        with socket.create_connection((host, port or 11300), timeout=5) as s:
            s.sendall(b"list-tubes\r\n")
            data = b""
            while not data.endswith(b"\r\n") or data.count(b"\r\n") < 2:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return f"- {address}\n" in data.decode().replace("\r\n", "\n")
    if u.scheme == "gearman" and address == "gearman:foreground":
        return None  # foreground jobs: no function of its own; gearmand drops them with the client
    if u.scheme == "gearman":
        host, port = u.hosts[0]
        with socket.create_connection((host, port or 4730), timeout=5) as s:
            s.sendall(b"status\n")
            data = b""
            while not (data == b".\n" or data.endswith(b"\n.\n")):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        for line in data.decode().splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[0] == address:
                return any(int(x) for x in parts[1:])  # jobs queued or running, or workers on it
        return False
    # amqp: direct reply-to declares no queue; the path is a channel, closed with its connection
    # (RabbitMQ 3.10 answers a mandatory publish to a live reply-to address with NO_ROUTE too,
    # and still delivers it, so a probe cannot tell)
    return None
