"""``mqprimer zmq-device FRONT BACK``: libzmq's own devices between many producers and many workers.

No broker of ours: ``zmq.proxy_steerable`` runs a streamer (PULL bound at FRONT's address,
PUSH bound at BACK's) and a forwarder (XSUB bound at FRONT's topic address, XPUB at BACK's),
each on a thread of its own, until SIGTERM or SIGINT. Producers connect to FRONT and workers to
BACK, both with ``?bind=none``. CURVE options on the URLs apply (the device is the server).
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from ._cli_common import EXIT_OK, UsageError, emit
from .errors import BrokerError
from .url import URL


def add_zmq_device(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "zmq-device", parents=[common], help="run a ZeroMQ streamer + forwarder between producers and workers",
        description="Bind FRONT (producers connect, ?bind=none) and BACK (workers and subscribers connect, "
        "?bind=none) and move messages between them with libzmq's own proxy: queues PULL->PUSH "
        "(fair queuing to workers), topics XSUB->XPUB (fan-out). Stops on SIGTERM/SIGINT.",
    )
    p.add_argument("front", help="zmq+tcp://HOST:PORT or zmq+ipc:///PATH that producers connect to")
    p.add_argument("back", help="zmq+tcp://HOST:PORT or zmq+ipc:///PATH that workers connect to")
    p.add_argument("--only", choices=("queues", "topics"), help="run one of the two devices")
    p.set_defaults(func=cmd_zmq_device)


def _settings(text: str) -> Any:
    from .backends import _zmq_link as link

    url = URL.parse(text)
    if url.scheme not in ("zmq+tcp", "zmq+ipc"):
        raise UsageError(f"zmq-device takes zmq+tcp:// or zmq+ipc:// URLs, not {url.scheme}://")
    return link.parse(url)


def cmd_zmq_device(args: argparse.Namespace) -> int:
    import zmq

    from .backends import _zmq_link as link

    front, back = _settings(args.front), _settings(args.back)
    pairs = []
    if args.only != "topics":
        pairs.append(("queues", zmq.PULL, front.queue_addr, zmq.PUSH, back.queue_addr))
    if args.only != "queues":
        pairs.append(("topics", zmq.XSUB, front.topic_addr, zmq.XPUB, back.topic_addr))
    ctx = link.context()
    errors: list[BaseException] = []
    bound = threading.Barrier(len(pairs) + 1, timeout=10)
    threads = []
    for i, (name, kin, ain, kout, aout) in enumerate(pairs):
        control = f"inproc://mqprimer-device-{i}"

        def run(kin: int = kin, ain: str = ain, kout: int = kout, aout: str = aout, control: str = control) -> None:
            socks = []
            try:
                socks.append(link.socket(front, kin, ain, True))
                socks.append(link.socket(back, kout, aout, True))
                ctl = ctx.socket(zmq.PAIR)
                ctl.linger = 0
                socks.append(ctl)
                ctl.bind(control)
            except BaseException as exc:
                errors.append(exc)
                bound.abort()
                for s in socks:
                    s.close(0)
                return
            bound.wait()
            try:
                zmq.proxy_steerable(socks[0], socks[1], None, ctl)
            finally:
                for s in socks:
                    s.close(0)

        t = threading.Thread(target=run, name=f"zmq-device-{name}", daemon=True)
        t.start()
        threads.append((t, control))
    try:
        bound.wait()
    except threading.BrokenBarrierError:
        raise BrokerError(f"zmq-device could not bind: {errors[0] if errors else 'timed out'}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    emit(args, "zmq-device: " + "; ".join(f"{n} {a} -> {b}" for n, _, a, _, b in pairs) + " (SIGTERM stops)",
         {"devices": [{"model": n, "front": a, "back": b} for n, _, a, _, b in pairs]})
    while not stop.wait(0.5):
        pass
    for t, control in threads:
        c = ctx.socket(zmq.PAIR)
        c.linger = 0
        c.connect(control)
        c.send(b"TERMINATE")
        t.join(5)
        c.close(0)
    return EXIT_OK
