"""ZeroMQ between real processes: fair queuing, fan-out, prefix safety, a SIGKILLed consumer
(plain mode: loss measured; acknowledged mode: nothing lost), peers absent or restarted, CURVE.

The peer processes are this file run as a script (``python tests/test_zeromq.py ROLE ...``):
each writes one line per message it handled to its output file, flushed, so the test can poll.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


# -- the peer processes --------------------------------------------------------------------
def _peer(argv: list[str]) -> None:
    import mqprimer

    role, url, dest, out = argv[:4]
    delay = float(argv[4]) if len(argv) > 4 else 0.0
    with mqprimer.connect(url) as conn, open(out, "a", buffering=1) as f:
        target = mqprimer.Topic(dest) if role == "subscribe" else dest
        with conn.consumer(target, prefetch=10) as c:
            f.write("ready\n")
            while True:
                m = c.receive(timeout=30)
                if m is None:
                    return
                if delay:
                    time.sleep(delay)  # a slow handler: messages pile up in this process
                m.ack()
                f.write(json.dumps({"id": m.id, "topic": m.body.get("topic"), "attempt": m.attempt}) + "\n")


class Peer:
    def __init__(self, tmp: Path, name: str, role: str, url: str, dest: str, delay: float = 0.0) -> None:
        self.out = tmp / f"{name}.out"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen([sys.executable, __file__, role, url, dest, str(self.out), str(delay)], env=env)

    def lines(self) -> list[dict[str, object]]:
        if not self.out.exists():
            return []
        return [json.loads(x) for x in self.out.read_text().splitlines() if x.startswith("{")]

    def ids(self) -> list[str]:
        return [str(x["id"]) for x in self.lines()]

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"peer exited early with {self.proc.returncode}")
        return self.out.exists() and self.out.read_text().startswith("ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.stop()


def _port() -> int:
    from conftest import free_port_pair

    return free_port_pair()


def _start(peers: list[Peer], tmp: Path, name: str, role: str, url: str, dest: str, delay: float = 0.0) -> Peer:
    p = Peer(tmp, name, role, url, dest, delay)
    peers.append(p)
    return p


# -- the tests -----------------------------------------------------------------------------
def test_fair_queuing_across_worker_processes(tmp_path: Path, peers: list[Peer]) -> None:
    import mqprimer
    from mqprimer.testing import wait_until

    url = f"zmq+tcp://127.0.0.1:{_port()}?bind=producer"  # one producer binds, workers connect
    workers = [_start(peers, tmp_path, f"w{i}", "consume", url, "jobs") for i in range(3)]
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        wait_until(lambda: all(w.ready() for w in workers), timeout=20, what="three workers")
        warm = []  # one at a time until each worker has one: then all three are connected
        deadline = time.monotonic() + 20
        while not all(w.ids() for w in workers):
            assert time.monotonic() < deadline, "a worker never got a message"
            warm.append(p.send("jobs", {"warm": True}))
            time.sleep(0.02)
        sent = [p.send("jobs", {"i": i}) for i in range(600)]
        wait_until(lambda: sum(len(w.ids()) for w in workers) == len(warm) + 600, timeout=20, what="every message")
    got = [i for w in workers for i in w.ids()]
    assert sorted(got) == sorted(warm + sent), "lost or duplicated messages"
    shares = [len(set(w.ids()) & set(sent)) for w in workers]
    assert min(shares) >= 150, f"PUSH did not share the work fairly: {shares}"  # round robin: 200 each


def test_pub_sub_fan_out_and_prefix_safety(tmp_path: Path, peers: list[Peer]) -> None:
    import mqprimer
    from mqprimer import Topic
    from mqprimer.testing import wait_until

    url = f"zmq+tcp://127.0.0.1:{_port()}"  # the publisher binds PORT+1, subscribers connect
    subs = [_start(peers, tmp_path, f"s{i}", "subscribe", url, "orders") for i in range(2)]
    other = _start(peers, tmp_path, "x", "subscribe", url, "ordersX")
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        wait_until(lambda: all(s.ready() for s in (*subs, other)), timeout=20, what="three subscribers")
        deadline = time.monotonic() + 20
        while not all(s.ids() for s in (*subs, other)):  # PUB drops until each subscription arrived
            assert time.monotonic() < deadline, "a subscriber never joined"
            p.send(Topic("orders"), {"topic": "probe"})
            p.send(Topic("ordersX"), {"topic": "probeX"})
            time.sleep(0.02)
        sent = [p.send(Topic("orders"), {"topic": "orders"}) for _ in range(100)]
        sent_x = [p.send(Topic("ordersX"), {"topic": "ordersX"}) for _ in range(50)]
        for s in subs:
            def got_all(s: Peer = s) -> bool:
                return set(sent) <= set(s.ids())

            wait_until(got_all, timeout=20, what="fan-out to every subscriber")
        wait_until(lambda: set(sent_x) <= set(other.ids()), timeout=20, what="the ordersX subscriber")
    for s in subs:
        assert {x["topic"] for x in s.lines()} == {"probe", "orders"}, "orders matched ordersX"
    assert {x["topic"] for x in other.lines()} == {"probeX", "ordersX"}, "ordersX matched orders"


def test_plain_mode_sigkilled_consumer_loses_what_it_buffered(tmp_path: Path, peers: list[Peer]) -> None:
    """Documented loss: the messages a killed PULL process had read are gone. Then a new
    consumer (the peer restarted) gets what was still in the producer's pipe, and new ones."""
    import mqprimer
    from mqprimer.testing import wait_until

    url = f"zmq+ipc://{tmp_path}/jobs.sock"
    first = _start(peers, tmp_path, "first", "consume", url, "jobs", delay=0.005)
    wait_until(first.ready, timeout=20, what="the first consumer")
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        sent = [p.send("jobs", {"i": i}) for i in range(2000)]
        wait_until(lambda: len(first.ids()) >= 50, timeout=20, what="50 handled")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        handled_first = first.ids()
        second = _start(peers, tmp_path, "second", "consume", url, "jobs")  # binds the same path again
        wait_until(second.ready, timeout=20, what="the restarted consumer")
        after = [p.send("jobs", {"i": i}) for i in range(100)]
        wait_until(lambda: set(after) <= set(second.ids()), timeout=20, what="messages sent after the restart")
    got = handled_first + second.ids()
    assert len(got) == len(set(got)), "a message was delivered twice"
    lost = set(sent) - set(got)
    print(f"plain mode: consumer SIGKILLed after {len(handled_first)} handled; {len(lost)} of {len(sent)} lost")
    assert lost, "plain mode is at-most-once: a killed consumer's buffer must be lost (documented)"


def test_ack_mode_sigkilled_consumer_loses_nothing(tmp_path: Path, peers: list[Peer]) -> None:
    import mqprimer
    from mqprimer.testing import wait_until

    url = f"zmq+tcp://127.0.0.1:{_port()}?ack=1&lease=0.5&linger=5"
    # the consumer starts first: the producer (which binds) is absent at its start
    first = _start(peers, tmp_path, "first", "consume", url, "jobs", delay=0.01)
    wait_until(first.ready, timeout=20, what="the first consumer")
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        sent = [p.send("jobs", {"i": i}) for i in range(300)]
        wait_until(lambda: len(first.ids()) >= 30, timeout=20, what="30 handled")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = _start(peers, tmp_path, "second", "consume", url, "jobs")
        wait_until(lambda: set(sent) <= set(first.ids()) | set(second.ids()), timeout=30, what="every message")
    redelivered = [x for x in second.lines() if x["attempt"] != 1]
    assert redelivered, "what the killed consumer held must come back counted as a second attempt"
    print(f"ack mode: consumer SIGKILLed after {len(first.ids())}; all {len(sent)} handled; "
          f"{len(set(first.ids()) & set(second.ids()))} duplicate(s), {len(redelivered)} counted as redelivered")


def test_many_to_many_through_zmq_device(tmp_path: Path, peers: list[Peer]) -> None:
    """Two producers, two workers and a subscriber, all connecting to `mqprimer zmq-device`."""
    import mqprimer
    from mqprimer import Topic
    from mqprimer.testing import wait_until

    front = f"zmq+tcp://127.0.0.1:{_port()}?bind=none"
    back = f"zmq+tcp://127.0.0.1:{_port()}?bind=none"
    device = subprocess.Popen([sys.executable, "-m", "mqprimer.cli", "zmq-device", front, back],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    try:
        assert device.stdout is not None and "queues tcp://" in device.stdout.readline()
        workers = [_start(peers, tmp_path, f"w{i}", "consume", back, "jobs") for i in range(2)]
        listener = _start(peers, tmp_path, "sub", "subscribe", back, "news")
        with mqprimer.connect(front) as a, mqprimer.connect(front) as b:
            wait_until(lambda: all(w.ready() for w in (*workers, listener)), timeout=20, what="the peers")
            deadline = time.monotonic() + 20
            warm = []
            while not all(w.ids() for w in workers) or not listener.ids():
                assert time.monotonic() < deadline, "no path through the device"
                warm.append(a.producer().send("jobs", {"warm": 1}))
                a.producer().send(Topic("news"), {"topic": "probe"})
                time.sleep(0.02)
            sent = [c.producer().send("jobs", {"i": i}) for i in range(100) for c in (a, b)]
            news = [b.producer().send(Topic("news"), {"topic": "news"}) for _ in range(20)]
            wait_until(lambda: sorted(i for w in workers for i in w.ids()) == sorted(warm + sent), timeout=20,
                       what="every job exactly once")
            wait_until(lambda: set(news) <= set(listener.ids()), timeout=20, what="the news through the forwarder")
        assert all(len(set(w.ids()) & set(sent)) >= 50 for w in workers), "the streamer did not share the work"
        device.send_signal(signal.SIGTERM)
        assert device.wait(10) == 0
    finally:
        if device.poll() is None:
            device.kill()
            device.wait(10)


@pytest.mark.parametrize("case", ["right keys", "wrong server key", "no key", "client not allowed"])
def test_curve(tmp_path: Path, case: str) -> None:
    import zmq.auth

    import mqprimer

    for name in ("server", "client", "other"):
        zmq.auth.create_certificates(tmp_path, name)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes((tmp_path / "client.key").read_bytes())
    port = _port()
    server = f"zmq+tcp://127.0.0.1:{port}?curve_secret={tmp_path}/server.key_secret&curve_allow={allowed}"
    client = {
        "right keys": f"?curve_secret={tmp_path}/client.key_secret&curve_server={tmp_path}/server.key",
        "wrong server key": f"?curve_secret={tmp_path}/client.key_secret&curve_server={tmp_path}/other.key",
        "no key": "",
        "client not allowed": f"?curve_secret={tmp_path}/other.key_secret&curve_server={tmp_path}/server.key",
    }[case]
    with mqprimer.connect(server) as srv, srv.consumer("secret") as c:
        with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}{client}?linger=0".replace("?linger", "&linger")
                              if client else f"zmq+tcp://127.0.0.1:{port}?linger=0") as cl:
            try:
                mid = cl.producer().send("secret", {"pin": 1234})
            except mqprimer.BrokerError as exc:
                # a refused handshake that finished before the send leaves no pipe: the send waits
                # at the high-water mark and fails (seen under a parallel run's load); nothing went
                assert case != "right keys" and "send_timeout" in str(exc), exc
                assert c.receive(timeout=1.5) is None, f"{case}: a message got through"
                return
            m = c.receive(timeout=3 if case == "right keys" else 1.5)
            if case == "right keys":
                assert m is not None and m.id == mid
                m.ack()
            else:
                assert m is None, f"{case}: a message got through"


def echo(message: object) -> dict[str, object]:
    """The handler of the request/reply test's worker process (its return value is the reply)."""
    return {"echo": message.body, "pid": os.getpid()}  # type: ignore[attr-defined]


@pytest.mark.parametrize("scheme", ["tcp", "ipc"])
def test_request_reply_between_processes(short_tmp: Path, scheme: str) -> None:
    """A worker process answers; a request with nobody serving times out and the reply path
    stays usable (no REQ socket to get stuck: the Lazy Pirate problem does not arise)."""
    import mqprimer

    tmp_path = short_tmp

    url = f"zmq+tcp://127.0.0.1:{_port()}" if scheme == "tcp" else f"zmq+ipc://{tmp_path}/rpc.sock"
    with mqprimer.connect(url) as conn:
        with pytest.raises(mqprimer.errors.Timeout):
            conn.request("rpc", {"n": 0}, timeout=0.3)  # no worker yet
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
        worker = subprocess.Popen([sys.executable, "-m", "mqprimer.cli", "worker", url, "rpc", "test_zeromq:echo",
                                   "--quiet"], env=env)
        try:
            replies = [conn.request("rpc", {"n": n}, timeout=15) for n in range(1, 6)]
            assert [r.body["echo"] for r in replies] == [{"n": n} for n in range(1, 6)]
            assert {r.body["pid"] for r in replies} == {worker.pid}
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(15) == 0
    if scheme == "ipc":
        assert not list(tmp_path.glob("rpc.sock.reply-*")), "a reply path was left behind"


def test_bound_push_with_no_worker_fails_clearly_after_send_timeout() -> None:
    import mqprimer

    url = f"zmq+tcp://127.0.0.1:{_port()}?bind=producer&send_timeout=0.3"
    start = time.monotonic()
    with mqprimer.connect(url) as conn, pytest.raises(mqprimer.errors.BrokerError, match="send_timeout=0.3s"):
        conn.producer().send("jobs", {"nobody": "connected"})
    assert time.monotonic() - start < 5


def test_send_fast_path_writes_the_same_frames_and_keeps_refusals_and_errors() -> None:
    # after a first plain send, Producer.send goes through the driver's fast_publisher: it must
    # frame and encode exactly like publish, refuse the same things, and word HWM errors alike
    import zmq

    import mqprimer
    from mqprimer.envelope import decode

    port = _port()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = 5000
    pull.connect(f"tcp://127.0.0.1:{port}")
    try:
        with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}?bind=producer&send_timeout=0.3&hwm=1",
                              max_message_size=2000) as conn:
            p = conn.producer()
            ids = [p.send("jobs", {"n": i}) for i in range(3)] + [p.send("jobs", {"n": 3}, type="job.made")]
            conn.endpoints[0].reset()  # as after a lost connection: the learnt path is stale
            ids += [p.send("jobs", {"n": 4}), p.send("jobs", {"n": 5})]
            assert p._fast["jobs"][5] is not None, "the fast path was never learnt"
            frames = [pull.recv() for _ in ids]
            envs = [decode(f.partition(b"\0")[2]) for f in frames]
            assert all(f.startswith(b"jobs\0{") for f in frames)
            assert [e.id for e in envs] == ids and [e.body["n"] for e in envs] == list(range(6))
            assert [e.type for e in envs] == ["mqprimer.message"] * 3 + ["job.made"] + ["mqprimer.message"] * 2
            with pytest.raises(mqprimer.errors.MessageTooLarge, match="2,000 bytes"):
                p.send("jobs", "x" * 2000)
            with pytest.raises(TypeError, match="not JSON-serialisable"):
                p.send("jobs", {"when": object()})
            pull.close(0)  # no peer any more: the PUSH blocks, then times out
            start = time.monotonic()
            with pytest.raises(mqprimer.errors.BrokerError, match="send_timeout=0.3s"):
                # until libzmq's I/O thread has seen the peer go: under load it first moved a
                # hundred sends on into the dead TCP connection (seen in a parallel run)
                for _ in range(100_000):
                    p.send("jobs", {"nobody": "reading"})
            assert time.monotonic() - start < 10
    finally:
        pull.close(0)
        ctx.term()


def test_bad_urls_name_what_is_wrong(tmp_path: Path) -> None:
    import mqprimer

    for url, words in [
        ("zmq+tcp://127.0.0.1", "one host and port"),
        ("zmq+ipc://", "socket path"),
        ("zmq+tcp://127.0.0.1:5555?bind=sideways", "bind='sideways'"),
        ("zmq+tcp://127.0.0.1:5555?ack=1&bind=consumer", "needs bind=producer"),
        ("zmq+tcp://127.0.0.1:5555?hwm=0", "hwm='0'"),
        (f"zmq+tcp://127.0.0.1:5555?curve_secret={tmp_path}/none", "existing key file"),
        ("zmq+tcp://127.0.0.1:5555?prefetch=3", "unknown option"),
    ]:
        with pytest.raises(mqprimer.errors.ConfigurationError, match=words.replace("?", r"\?")):
            mqprimer.connect(url)
    with mqprimer.connect("zmq+tcp://127.0.0.1:5555") as conn:
        with pytest.raises(mqprimer.UnsupportedError, match="durable"):
            conn.consumer(mqprimer.Topic("a"), subscription="billing")
        for option in ({"priority": 5}, {"delay": 1.0}):
            with pytest.raises(mqprimer.UnsupportedError):
                conn.producer().send("q", 1, **option)  # type: ignore[arg-type]
    with mqprimer.connect("zmq+tcp://127.0.0.1:5555?ack=1") as conn:
        with pytest.raises(mqprimer.UnsupportedError, match="zeromq-ack .* publish-subscribe"):
            conn.producer().send(mqprimer.Topic("a"), 1)


@pytest.mark.timeout(120)
def test_pipeline_example(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]), TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "examples.pipeline", "--workers", "3", "--tasks", "60"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "60/60 results" in r.stdout and r.stdout.count("worker pid ") == 3, r.stdout
    assert "workers exited with [0, 0, 0]" in r.stdout


if __name__ == "__main__":
    _peer(sys.argv[1:])


@pytest.mark.parametrize("closing", ["producer", "connection"])
def test_sends_after_close_are_refused_once_the_fast_path_was_learnt(closing: str) -> None:
    # send()'s fast path checks no closed flag per message: Producer.close drops the learnt
    # paths, and a closed connection has reset the endpoint whose backend the path checks
    import mqprimer

    conn = mqprimer.connect(f"zmq+tcp://127.0.0.1:{_port()}?linger=0")
    try:
        p = conn.producer()
        p.send("jobs", {"n": 1})
        p.send("jobs", {"n": 2})
        assert p._fast["jobs"][5] is not None, "the fast path was never learnt"
        (p if closing == "producer" else conn).close()
        with pytest.raises(mqprimer.StateError, match="closed"):
            p.send("jobs", {"n": 3})
    finally:
        conn.close()


def test_fast_path_frames_are_the_envelope_format_byte_for_byte_and_options_stay_keyword_only() -> None:
    # send()'s fast path fills a per-millisecond format (_ids.Frames) with the id's last digits
    # and the body: the frame must be exactly fresh_format's (held to build() by test_envelope),
    # also where the source and type hold % signs, which that format escapes
    import inspect

    import zmq

    import mqprimer
    from mqprimer.envelope import decode, fresh_format

    port = _port()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = 5000
    pull.connect(f"tcp://127.0.0.1:{port}")
    source = 'urn:100%-"odd"%b%%s'
    try:
        with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}?bind=producer", source=source) as conn:
            p = conn.producer()
            sent = [(t, p.send("jobs", {"n": i, "s": "%b%s"}, type=t))
                    for i, t in enumerate([None, "a%b%%c", None, "a%b%%c", None, None])]
            assert p._fast["jobs"][5] is not None and p._fast["jobs"][10] is not None, "fast path not learnt"
            for t, mid in sent:
                frame = pull.recv()
                name, _, payload = frame.partition(b"\0")
                env = decode(payload)
                assert name == b"jobs" and env.id == mid and env.source == source
                assert env.time is not None
                body = msgspec_json(env.body)
                assert payload == fresh_format(source, t or "mqprimer.message") % (mid.encode(), env.time.encode(),
                                                                                    body)
            # an option passed positionally is refused on the fast path too, never dropped
            for bad in ({"k": "v"}, None):
                with pytest.raises(TypeError, match="keyword-only"):
                    p.send("jobs", {"n": 9}, bad)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="keyword-only"):
                p.send("jobs", {"n": 9}, _keywords_only=None)  # type: ignore[call-arg,arg-type]
            params = inspect.signature(p.send).parameters
            assert list(params) == ["destination", "body", "headers", "type", "priority", "delay", "ttl", "id"]
            assert {n for n, q in params.items() if q.kind is q.KEYWORD_ONLY} == set(list(params)[2:])
            pull.rcvtimeo = 300
            with pytest.raises(zmq.Again):
                pull.recv()  # nothing of the refused sends went out
    finally:
        pull.close(0)
        ctx.term()


def msgspec_json(value: object) -> bytes:
    import msgspec

    return msgspec.json.encode(value)


def test_messages_already_buffered_are_checked_like_the_first() -> None:
    # Consumer.receive decodes a message already waiting in the driver's buffer inline (its
    # fast path); an expired one, a foreign one and one with malformed headers must still be
    # dropped or dead-lettered there, and a message with headers must keep them. Everything
    # goes through the one PUSH socket, so it arrives in this order.
    import mqprimer
    from mqprimer.backend import Queue

    with mqprimer.connect(f"zmq+tcp://127.0.0.1:{_port()}") as conn, conn.consumer("jobs") as c:
        p = conn.producer()
        sent = [p.send("jobs", {"n": 0}), p.send("jobs", {"n": 1})]  # the second one learns send()'s fast path
        p.send("jobs", {"expired": True}, ttl=0.05)
        sent.append(p.send("jobs", {"n": 2}))
        bad = p.build("jobs", {"n": 3}).payload.replace(b'"data"', b'"mqheaders":"{\\"k\\": 1}","data"')
        backend = conn.endpoints[0].backend
        assert backend is not None
        for payload in (bad, b"not json"):  # each right after a message the fast path took
            backend.publish(Queue("jobs"), payload, message_id="raw")
        sent += [p.send("jobs", {"n": 4}, headers={"tenant": "acme"}), p.send("jobs", {"n": 5})]
        time.sleep(0.5)  # all of it in the PULL socket, and the ttl over
        got = []
        for _ in sent:
            m = c.receive(timeout=5)
            assert m is not None
            got.append((m.id, m.headers))
            m.ack()
        assert [g[0] for g in got] == sent, "a message was lost, or the expired one delivered"
        assert got[3][1] == {"tenant": "acme"}
        assert c.receive(timeout=0.3) is None
        dead = conn.dead_letters("jobs").list()
        assert len(dead) == 2 and all("invalid envelope" in (d.reason or "") for d in dead), dead


def test_a_live_consumer_loses_nothing_at_a_small_hwm(short_tmp: Path) -> None:
    # PUSH/PULL blocks at the high-water mark, so a consumer that reads everything must get
    # everything. This process's buffer took up to 512 frames per read into a deque bounded
    # at hwm, which dropped the oldest silently (hwm=5: 1,748 of 3,000 arrived).
    import threading

    import mqprimer

    url = f"zmq+ipc://{short_tmp}/hwm.sock?hwm=5"
    n = 3000
    with mqprimer.connect(url) as conn, conn.consumer("q") as c:
        errors: list[BaseException] = []
        done = threading.Event()

        def produce() -> None:
            try:
                with mqprimer.connect(url) as other:
                    p = other.producer()
                    for i in range(n):
                        p.send("q", {"i": i})
                    # open until all arrived: libzmq itself may drop the tail of an ipc PUSH that
                    # closes while its peer is behind at a small HWM, linger or not (documented)
                    done.wait(30)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        t = threading.Thread(target=produce)
        t.start()
        backend = conn.endpoints[0].backend
        assert backend is not None
        buffered = next(h for h in backend.hubs.values() if b"q" in h.queues).queues[b"q"]
        got: list[int] = []
        most = 0
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            m = c.receive(timeout=0.5)
            if m is not None:
                got.append(m.body["i"])
                m.ack()
                most = max(most, len(buffered))
        done.set()
        t.join(30)
        assert not errors, errors
        assert got == list(range(n)), f"{n - len(got)} of {n} lost"
        assert most < 5, f"{most} messages were buffered in this process at hwm=5"


def test_a_queue_nobody_reads_on_a_shared_socket_is_warned_about_once(
        short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    # one socket has one HWM: queue a's consumer reads b's messages into this process to get at
    # its own, and b's consumer never reads them, so they pile up here; a warning says so
    import logging
    import threading

    import mqprimer

    url = f"zmq+ipc://{short_tmp}/shared.sock?hwm=5"
    with mqprimer.connect(url) as conn, conn.consumer("a") as a, conn.consumer("b"):
        p = conn.producer()

        def produce() -> None:  # in a thread: at hwm=5 a send waits until a's reads make room
            for i in range(300):
                p.send("b", {"i": i})
            p.send("a", {"i": 0})

        t = threading.Thread(target=produce)
        with caplog.at_level(logging.WARNING, logger="mqprimer"):
            t.start()
            m = a.receive(timeout=20)
            t.join(20)
            assert m is not None and m.body == {"i": 0}
            p.send("a", {"i": 1})
            assert a.receive(timeout=10) is not None
        warned = [r.getMessage() for r in caplog.records if "wait in this process" in r.getMessage()]
        assert len(warned) == 1 and "'b'" in warned[0], warned
