"""ZeroMQ: raw pyzmq against mqprimer on the same loopback, producer and consumer in separate processes.

    .venv/bin/python benchmarks/bench_zeromq.py [--n 200000] [--profile] [--json]
    .venv/bin/python benchmarks/bench_zeromq.py --callgrind [--frozen-clock] [--n 10000]

Rows: raw pyzmq PUSH/PULL; raw pyzmq + stdlib json (the envelope a user would write by hand);
raw pyzmq send alone and mqprimer send alone (the send loop timed, a raw PULL drains);
mqprimer send_many alone, 100 messages a call (its batch frames: many envelopes a frame);
mqprimer send + receive + ack end to end, and the same with send_many; PUB/SUB. ``--profile`` prints where the
per-message time goes (cProfile, in-process).

``--callgrind`` counts CPU instructions per message instead (valgrind, apt-get install
valgrind), which the other processes on a shared machine do not disturb: each loop (mqprimer
send, raw pyzmq send, mqprimer receive + ack, raw pyzmq recv + msgspec decode) runs under
callgrind twice, with n and 3n messages, and the difference is divided by 2n, so start-up
cancels out. It counts every thread of the measured process (libzmq's I/O thread too); the
peer process runs outside valgrind. A receive loop starts once its peer has sent everything.
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

import msgspec
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Result, free_port_pair, report  # noqa: E402

import mqprimer  # noqa: E402

BODY = {"path": "photos/2024/a.jpg", "size": 128, "tenant": "acme"}


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
            got = 0
            while got < n:  # a batch frame (send_many) carries one message per NUL
                raw = recv()
                got += raw.count(b"\0") if raw[:1] == b"\x01" else 1
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
    addr = f"tcp://127.0.0.1:{free_port_pair()}"
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


def raw_send_alone(n: int) -> Result:
    """The send loop only, as ``mqprimer send alone`` (a raw PULL drains): the bound for that row."""
    addr = f"tcp://127.0.0.1:{free_port_pair()}"
    p = spawn("pull", addr, n)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.sndhwm = 100_000
    s.connect(addr)
    payload, send = b"bench\0" + b"x" * 220, s.send
    start = time.perf_counter()
    for _ in range(n):
        send(payload)
    secs = time.perf_counter() - start
    finish(p)
    s.close(0)
    return Result("raw pyzmq send alone", n, secs)


def raw_pub(n: int) -> Result:
    addr = f"tcp://127.0.0.1:{free_port_pair()}"
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
    port = free_port_pair()
    p = spawn("pull", f"tcp://127.0.0.1:{port}", n)
    with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}?hwm=100000") as conn:
        send = conn.producer().send
        start = time.perf_counter()
        for _ in range(n):
            send("bench", BODY)
        secs = time.perf_counter() - start
        finish(p)
    return Result("mqprimer send alone", n, secs)


BATCH = 100  # messages per send_many call in the send_many rows


def _send_many_all(producer: mqprimer.Producer, n: int) -> None:
    batch = [("bench", BODY)] * BATCH
    send_many = producer.send_many
    for _ in range(n // BATCH):
        send_many(batch)
    for _ in range(n % BATCH):
        producer.send("bench", BODY)


def mq_send_many_alone(n: int) -> Result:
    port = free_port_pair()
    p = spawn("pull", f"tcp://127.0.0.1:{port}", n)
    with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}?hwm=100000") as conn:
        producer = conn.producer()
        producer.send("bench", BODY)  # learns send()'s fast path, which send_many's batches take
        start = time.perf_counter()
        _send_many_all(producer, n - 1)
        secs = time.perf_counter() - start
        finish(p)
    return Result(f"mqprimer send_many alone ({BATCH} a call)", n - 1, secs)


def mq_send_many_end_to_end(n: int) -> Result:
    port = free_port_pair()
    url = f"zmq+tcp://127.0.0.1:{port}?hwm=100000"
    p = spawn("mq", f"{url} bench", n)
    with mqprimer.connect(url) as conn:
        producer = conn.producer()
        start = time.perf_counter()
        producer.send("bench", BODY)
        _send_many_all(producer, n - 1)
        finish(p)
        secs = time.perf_counter() - start
    return Result(f"mqprimer PUSH/PULL send_many+receive+ack ({BATCH} a call)", n, secs)


def mq_end_to_end(n: int, topic: bool) -> Result:
    port = free_port_pair()
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


# -- instructions per message (--callgrind) ---------------------------------------------------
def _freeze_clock() -> None:
    """One millisecond for the whole run (``--frozen-clock``): under valgrind a process runs
    ~50x slower, so a new millisecond would come every few sends, and the once-a-millisecond
    work (new id head and time) would weigh ~50x what it does at native speed, by an amount
    that depends on how loaded the machine is."""
    import itertools

    import mqprimer._ids
    import mqprimer.producer

    now = time.time_ns()
    mqprimer._ids._time_ns = mqprimer.producer._time_ns = itertools.repeat(now).__next__


def loop(kind: str, port: int, n: int, flag: str) -> None:
    """One measured loop; ``flag``: a file that says the peer has sent everything (receive loops)."""
    if os.environ.get("BENCH_FROZEN_CLOCK") == "1":
        _freeze_clock()
    url = f"zmq+tcp://127.0.0.1:{port}?hwm=10000000&linger=600&send_timeout=600"
    ctx = zmq.Context()
    if kind in ("send-raw", "recv-raw"):
        s = ctx.socket(zmq.PUSH if kind == "send-raw" else zmq.PULL)
        s.sndhwm = s.rcvhwm = 0
        if kind == "send-raw":
            s.connect(f"tcp://127.0.0.1:{port}")
            payload, raw_send = b"x" * 220, s.send
            for _ in range(n):
                raw_send(payload)
            while not os.path.exists(flag):  # the drain has it all: nothing is cut off at exit
                time.sleep(0.1)
        else:
            s.bind(f"tcp://127.0.0.1:{port}")
            decode, recv = msgspec.json.Decoder().decode, s.recv
            while not os.path.exists(flag):
                time.sleep(0.1)
            time.sleep(5.0)  # libzmq's I/O thread, slow under valgrind, moves the rest into the pipe
            for _ in range(n):
                decode(recv().partition(b"\0")[2])
        s.close(600_000)
        return
    with mqprimer.connect(url) as conn:
        if kind == "send-mq":
            send = conn.producer().send
            for _ in range(n):
                send("bench", BODY)
            while not os.path.exists(flag):
                time.sleep(0.1)
            return
        with conn.consumer("bench", prefetch=1000) as c:
            while not os.path.exists(flag):
                time.sleep(0.1)
            time.sleep(5.0)  # as above: a receive that waits would count the wait's instructions
            for _ in range(n):
                m = c.receive(timeout=600)
                assert m is not None
                m.ack()


def peer(kind: str, port: int, n: int, flag: str) -> None:
    """The other end of a measured loop, outside valgrind: drains, or sends everything and says so."""
    ctx = zmq.Context()
    if kind.startswith("send"):
        s = ctx.socket(zmq.PULL)
        s.rcvhwm = 0
        s.bind(f"tcp://127.0.0.1:{port}")
        for _ in range(n):
            s.recv()
        Path(flag).touch()
        return
    # mqprimer's envelopes on a socket of this process's own context, whose term() returns only
    # once all is delivered (a process that exits with messages in its pipe loses them)
    with mqprimer.connect("memory://bench") as conn:
        frames = [b"bench\0" + conn.producer().build("bench", BODY).payload for _ in range(n)]
    s = ctx.socket(zmq.PUSH)
    s.sndhwm = 0
    s.connect(f"tcp://127.0.0.1:{port}")
    for frame in frames:
        s.send(frame)
    s.close()
    ctx.term()
    Path(flag).touch()


def instructions(kind: str, n: int) -> float:
    counts = []
    for count in (n, 3 * n):
        port = free_port_pair()
        flag = f"/tmp/bench-zmq-{os.getpid()}-{port}.sent"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"), PYTHONHASHSEED="0")
        me, args = [sys.executable, __file__], [kind, str(port), str(count), flag]
        measured = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *me, "--loop", *args]
        if kind.startswith("send"):
            drain = subprocess.Popen([*me, "--peer", *args], env=env)
            time.sleep(0.5)  # the drain binds first
            err = subprocess.run(measured, env=env, capture_output=True, text=True, check=True).stderr
            drain.wait(600)
            Path(flag).unlink(missing_ok=True)
        else:
            proc = subprocess.Popen(measured, env=env, stderr=subprocess.PIPE, text=True)
            subprocess.run([*me, "--peer", *args], env=env, check=True)
            err = proc.communicate()[1]
            Path(flag).unlink(missing_ok=True)
        counts.append(int(err.split("Collected :")[1].split()[0].replace(",", "")))
    return (counts[1] - counts[0]) / (2 * n)


def callgrind(n: int, frozen: bool) -> None:
    os.environ["BENCH_FROZEN_CLOCK"] = "1" if frozen else "0"
    print(f"\n## CPU instructions per message (callgrind, n={n} and {3 * n}, difference / {2 * n}"
          f"{', clock frozen' if frozen else ''})")
    rows = {k: instructions(k, n) for k in ("send-raw", "send-mq", "recv-raw", "recv-mq")}
    names = {"send-raw": "raw pyzmq send", "send-mq": "mqprimer send", "recv-raw": "raw pyzmq recv + msgspec decode",
             "recv-mq": "mqprimer receive + ack"}
    for k, v in rows.items():
        print(f"{names[k]:44} {v:10,.0f}")
    print(f"ratio mqprimer send / raw send: {rows['send-mq'] / rows['send-raw']:.2f}x")
    print(f"ratio mqprimer receive + ack / raw recv + decode: {rows['recv-mq'] / rows['recv-raw']:.2f}x")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) > 1 and sys.argv[1] in ("--loop", "--peer"):
        (loop if sys.argv[1] == "--loop" else peer)(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--frozen-clock", action="store_true", help="with --callgrind: one millisecond for the run")
    a = ap.parse_args()
    n = a.n
    if a.callgrind:
        callgrind(n if n != 200_000 else 10_000, a.frozen_clock)
        return
    rows = [raw_push(n, False), raw_push(n, True), raw_pub(n), raw_send_alone(n), mq_send_alone(n),
            mq_send_many_alone(n), mq_end_to_end(n, False), mq_send_many_end_to_end(n), mq_end_to_end(n, True)]
    report(f"ZeroMQ over loopback TCP, producer and consumer in separate processes ({zmq.zmq_version()})", rows, [
        ("mqprimer PUSH/PULL send+receive+ack", "raw pyzmq PUSH/PULL"),
        ("mqprimer PUSH/PULL send+receive+ack", "raw pyzmq + stdlib json"),
        ("mqprimer send alone", "raw pyzmq PUSH/PULL"),
        ("mqprimer send alone", "raw pyzmq send alone"),
        (f"mqprimer send_many alone ({BATCH} a call)", "raw pyzmq send alone"),
        (f"mqprimer PUSH/PULL send_many+receive+ack ({BATCH} a call)", "raw pyzmq PUSH/PULL"),
        ("mqprimer PUB/SUB send+receive+ack", "raw pyzmq PUB/SUB"),
    ])
    if a.profile:
        profile(min(n, 100_000))


if __name__ == "__main__":
    main()
