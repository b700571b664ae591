"""A small TCP proxy for fault tests: put it between a client and a broker, then break the link.

Loopback only, one thread per direction of each connection (fault tests open a handful)::

    with Proxy(("127.0.0.1", 5672)) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        ...
        proxy.cut()        # drop every current connection (a network cut); new ones pass
        proxy.blackhole()  # keep connections open but pass nothing (a frozen network)
        proxy.refuse()     # close every connection and each new one at once (an endpoint down)
        proxy.slow(0.2)    # delay every chunk by 0.2 s
        proxy.restore()    # back to passing everything

It exists because no off-the-shelf fault proxy (toxiproxy, tc netem) is available here,
and killing the broker cannot tell "the broker died" apart from "the network did".
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import TracebackType

_CHUNK = 65536


class Proxy:
    """Relays TCP connections from ``127.0.0.1:port`` to ``target``; see the module docstring."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        host = target[0]
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the test proxy only relays to loopback, not {host!r}")
        self.target = ("127.0.0.1" if host == "localhost" else host, target[1])
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._mode = "pass"  # pass | blackhole | refuse
        self._delay = 0.0
        self._stopped = threading.Event()
        self.accepted = 0  # connections accepted so far (tests check that clients reconnected)
        self.relayed = 0  # bytes passed on, either way (tests check that a refused endpoint carried nothing)
        self._sending = 0  # pumps between their mode check and their count: refuse() waits for them
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy:{self.port}", daemon=True)
        self._thread.start()

    # -- controls ---------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> None:
        """Drop every current connection (both sides see a reset); new connections pass."""
        self._drop_all()

    def blackhole(self) -> None:
        """Keep every connection open and accept new ones, but pass no byte either way."""
        self._mode = "blackhole"

    def refuse(self) -> None:
        """An endpoint that is down: drop every connection and close each new one at once."""
        with self._lock:
            self._mode = "refuse"
        self._drop_all()
        # a pump that checked the mode just before may still be sending: once it has counted
        # (or failed on the socket just killed), ``relayed`` no longer moves until restore()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with self._lock:
                if not self._sending:
                    return
            time.sleep(0.005)

    def slow(self, delay: float) -> None:
        """Pass everything, each chunk ``delay`` seconds late."""
        self._delay = delay
        self._mode = "pass"

    def restore(self) -> None:
        """Pass everything again, at full speed."""
        self._delay = 0.0
        self._mode = "pass"

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        self._drop_all()
        self._thread.join(2)

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- relaying ---------------------------------------------------------------------
    def _drop_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                _kill(s)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._mode == "refuse":
                _kill(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _kill(client)  # the broker itself is down: the client sees what it would see
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                refused = self._mode == "refuse"  # refuse() came while this one was connecting
                if not refused:
                    self._pairs.append((client, upstream))
                    self.accepted += 1
            if refused:
                _kill(client)
                _kill(upstream)
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                while self._mode == "blackhole" and not self._stopped.is_set():
                    time.sleep(0.02)  # hold the bytes: a frozen network loses nothing it had
                if self._delay:
                    time.sleep(self._delay)
                with self._lock:
                    if self._mode == "refuse":
                        break  # the endpoint went down with these bytes in hand: they never arrive
                    self._sending += 1
                try:
                    dst.sendall(data)
                    with self._lock:
                        self.relayed += len(data)
                finally:
                    with self._lock:
                        self._sending -= 1
        except OSError:
            pass
        # one side closed or failed: close the pair, as a real connection would end
        with self._lock:
            self._pairs = [p for p in self._pairs if src not in p]
        _kill(src)
        _kill(dst)


def _kill(s: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), so the peer sees the cut at once."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
