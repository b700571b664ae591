"""ZeroMQ: raw pyzmq against mqprimer on the same loopback, producer and consumer in separate processes.

    .venv/bin/python benchmarks/bench_zeromq.py [--n 200000] [--profile] [--json]

Rows: raw pyzmq PUSH/PULL; raw pyzmq + stdlib json (the envelope a user would write by hand);
mqprimer send alone (a raw PULL drains); mqprimer send + receive + ack end to end; the same
for PUB/SUB. ``--profile`` prints where the per-message time goes (cProfile, in-process).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, report  # noqa: E402

import mqprimer  # noqa: E402

BODY = {"path": "photos/2024/a.jpg", "size": 128, "tenant": "acme"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the consumer process -------------------------------------------------------------------
def child(kind: str, addr: str, n: int) -> None:
    if kind.startswith("mq"):
        url, dest = addr.split(" ")
        with mqprimer.connect(url) as conn:
            target = mqprimer.Topic(dest) if kind == "mq-sub" else dest
            with conn.consumer(target, prefetch=1000) as c:
                print("ready", flush=True)
                for _ in range(n):
                    m = c.receive(timeout=30)
                    if m is None:
                        print("timeout", flush=True)
                        return
                    m.ack()
        print("done", flush=True)
        return
    ctx = zmq.Context()
    if kind == "sub":
        s = ctx.socket(zmq.SUB)
        s.subscribe(b"bench\0")
        s.rcvhwm = 0
        s.connect(addr)
    else:
        s = ctx.socket(zmq.PULL)
        s.rcvhwm = 100_000
        s.bind(addr)
    s.rcvtimeo = 30_000
    print("ready", flush=True)
    recv = s.recv
    try:
        if kind == "json":
            loads = json.loads
            for _ in range(n):
                loads(recv())
        else:
            for _ in range(n):
                recv()
    except zmq.Again:
        print("timeout", flush=True)
        return
    print("done", flush=True)


def spawn(kind: str, addr: str, n: int) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, __file__, "--child", kind, addr, str(n)], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src")))
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def finish(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    p.wait(30)
    if line != "done":
        raise SystemExit(f"consumer process failed: {line!r}")


# -- the cases ------------------------------------------------------------------------------
def raw_push(n: int, as_json: bool) -> Result:
    addr = f"tcp://127.0.0.1:{_port()}"
    p = spawn("json" if as_json else "pull", addr, n)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.sndhwm = 100_000
    s.connect(addr)
    src = f"urn:bench:{socket.gethostname()}"
    start = time.perf_counter()
    if as_json:
        dumps, send = json.dumps, s.send
        for _ in range(n):
            env = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": src, "type": "mqprimer.message",
                   "time": "2024-01-01T00:00:00Z", "datacontenttype": "application/json", "data": BODY}
            send(dumps(env).encode())
    else:
        payload = b"x" * 220
        for _ in range(n):
            s.send(payload)
    finish(p)
    secs = time.perf_counter() - start
    s.close(0)
    return Result("raw pyzmq + stdlib json" if as_json else "raw pyzmq PUSH/PULL", n, secs)


def raw_pub(n: int) -> Result:
    addr = f"tcp://127.0.0.1:{_port()}"
    ctx = zmq.Context()
    s = ctx.socket(zmq.XPUB)
    s.sndhwm = 0
    s.bind(addr)
    p = spawn("sub", addr, n)
    s.poll(10_000)  # the subscription arrived: nothing is dropped as a slow joiner
    s.recv()
    payload = b"bench\0" + b"x" * 220
    start = time.perf_counter()
    for _ in range(n):
        s.send(payload)
    finish(p)
    secs = time.perf_counter() - start
    s.close(0)
    return Result("raw pyzmq PUB/SUB", n, secs)


def mq_send_alone(n: int) -> Result:
    port = _port()
    p = spawn("pull", f"tcp://127.0.0.1:{port}", n)
    with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}?hwm=100000") as conn:
        send = conn.producer().send
        start = time.perf_counter()
        for _ in range(n):
            send("bench", BODY)
        secs = time.perf_counter() - start
        finish(p)
    return Result("mqprimer send alone", n, secs)


def mq_end_to_end(n: int, topic: bool) -> Result:
    port = _port()
    url = f"zmq+tcp://127.0.0.1:{port}?hwm=100000"
    if topic:
        dest: str | mqprimer.Topic = mqprimer.Topic("bench")
        with mqprimer.connect(url) as conn:
            send = conn.producer().send
            send(dest, {"warm": 1})  # binds the publisher
            p = spawn("mq-sub", f"{url} bench", n)
            time.sleep(0.5)  # the subscriber's subscription arrives (PUB drops before: documented)
            start = time.perf_counter()
            for _ in range(n):
                send(dest, BODY)
            finish(p)
            secs = time.perf_counter() - start
        return Result("mqprimer PUB/SUB send+receive+ack", n, secs)
    p = spawn("mq", f"{url} bench", n)
    with mqprimer.connect(url) as conn:
        send = conn.producer().send
        start = time.perf_counter()
        for _ in range(n):
            send("bench", BODY)
        finish(p)
        secs = time.perf_counter() - start
    return Result("mqprimer PUSH/PULL send+receive+ack", n, secs)


def profile(n: int) -> None:
    url = f"zmq+ipc:///tmp/mqprimer-bench-{os.getpid()}.sock"
    with mqprimer.connect(url) as conn:
        send = conn.producer().send
        c = conn.consumer("prof", prefetch=1000)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n // 1000):  # in rounds, so the pipe never reaches its high-water mark
            for _ in range(1000):
                send("prof", BODY)
            for _ in range(1000):
                m = c.receive(timeout=10)
                assert m is not None
                m.ack()
        prof.disable()
        c.close()
    print(f"\n## profile: {n} x (send, then receive + ack), one process, tottime order")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    n = a.n
    rows = [raw_push(n, False), raw_push(n, True), raw_pub(n), mq_send_alone(n), mq_end_to_end(n, False),
            mq_end_to_end(n, True)]
    report(f"ZeroMQ over loopback TCP, producer and consumer in separate processes ({zmq.zmq_version()})", rows, [
        ("mqprimer PUSH/PULL send+receive+ack", "raw pyzmq PUSH/PULL"),
        ("mqprimer PUSH/PULL send+receive+ack", "raw pyzmq + stdlib json"),
        ("mqprimer send alone", "raw pyzmq PUSH/PULL"),
        ("mqprimer PUB/SUB send+receive+ack", "raw pyzmq PUB/SUB"),
    ])
    if a.profile:
        profile(min(n, 100_000))


if __name__ == "__main__":
    main()
