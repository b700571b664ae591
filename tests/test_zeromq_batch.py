"""ZeroMQ batch frames: ``send_many`` of plain messages to one queue packs many envelopes into
one frame (``Backend.batch_publisher``) and the consumer's read splits them. What must hold: the
same envelopes, ids and order as ``send()``; every refusal as before, with nothing sent; frames
bounded so PUSH still spreads a batch over its workers; a frame that cannot be packed goes out
one message at a time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def _port() -> int:
    from conftest import free_port_pair

    return free_port_pair()


def _raw_pull(port: int):  # type: ignore[no-untyped-def]
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvtimeo = 5000
    pull.connect(f"tcp://127.0.0.1:{port}")
    return ctx, pull


def _frames(pull, n_messages: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Frames off a raw PULL until they carry ``n_messages`` (a batch frame: one per NUL)."""
    frames, got = [], 0
    while got < n_messages:
        raw = pull.recv()
        frames.append(raw)
        got += raw.count(b"\0") if raw[:1] == b"\x01" else 1
    return frames


def test_send_many_packs_the_same_envelopes_into_bounded_frames() -> None:
    import mqprimer
    from mqprimer.envelope import decode

    port = _port()
    ctx, pull = _raw_pull(port)
    try:
        with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}?bind=producer") as conn:
            p = conn.producer()
            # a first send_many to the queue goes one frame each and learns send()'s fast path,
            # which batches need (as a first send() does)
            first = p.send_many([("jobs", {"n": -1})] * 2)
            ids = p.send_many([("jobs", {"n": i}) for i in range(300)])
            frames = _frames(pull, 302)
        assert frames[0].startswith(b"jobs\0{") and frames[1].startswith(b"jobs\0{")
        batches = frames[2:]
        # 300 envelopes in frames of at most 128: PUSH hands each frame to one worker
        assert [f.count(b"\0") for f in batches] == [128, 128, 44], [f[:20] for f in batches]
        assert all(f.startswith(b"\x01jobs\0{") for f in batches)
        envs = [decode(e) for f in batches for e in f.partition(b"\0")[2].split(b"\0")]
        assert [e.id for e in envs] == ids and [e.body["n"] for e in envs] == list(range(300))
        one = decode(frames[0].partition(b"\0")[2])
        assert {(e.source, e.type, e.specversion) for e in envs} == {(one.source, one.type, one.specversion)}
        assert len(set(ids) | set(first)) == 302
    finally:
        pull.close(0)
        ctx.term()


def test_a_consumer_gets_every_batched_message_in_order_beside_single_ones(short_tmp: Path) -> None:
    import threading

    import mqprimer

    url = f"zmq+ipc://{short_tmp}/batch.sock?hwm=5"  # a batch frame fills a small buffer at once
    with mqprimer.connect(url) as conn, conn.consumer("jobs") as c:
        p = conn.producer()
        sent: list[str] = []

        def produce() -> None:  # in a thread: at hwm=5 a send may wait for the reads below
            sent.append(p.send("jobs", {"n": 0}))
            sent.extend(p.send_many([("jobs", {"n": i}) for i in range(1, 1001)]))
            sent.append(p.send("jobs", {"n": 1001}))
            sent.extend(p.send_many([("jobs", {"n": 1002}), ("jobs", {"n": 1003})]))

        t = threading.Thread(target=produce)
        t.start()
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 1004 and time.monotonic() < deadline:
            m = c.receive(timeout=0.5)
            if m is not None:
                got.append((m.id, m.body["n"]))
                m.ack()
        t.join(30)
        assert [g[0] for g in got] == sent, f"{len(sent) - len(got)} of {len(sent)} lost or out of order"
        assert [g[1] for g in got] == list(range(1004))
        assert c.receive(timeout=0.2) is None


def test_refusals_in_a_batch_send_nothing_as_before() -> None:
    import mqprimer

    port = _port()
    ctx, pull = _raw_pull(port)
    try:
        with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}?bind=producer", max_message_size=2000) as conn:
            p = conn.producer()
            p.send("jobs", {"n": 0})
            assert pull.recv().startswith(b"jobs\0")
            with pytest.raises(mqprimer.errors.MessageTooLarge, match="2,000 bytes"):
                p.send_many([("jobs", {"n": 1}), ("jobs", "x" * 2000)])
            with pytest.raises(TypeError, match="not JSON-serialisable"):
                p.send_many([("jobs", {"n": 1}), ("jobs", {"when": object()})])
            with pytest.raises(mqprimer.errors.UnsupportedError):
                p.send_many([("jobs", {"n": 1}), p.build("jobs", {"n": 2}, priority=5)])
            pull.rcvtimeo = 300
            with pytest.raises(Exception, match="Resource temporarily unavailable"):
                pull.recv()  # nothing of the refused batches went out
            # a mixed batch (another queue, an Outgoing) goes out as before, one frame each
            ids = p.send_many([("jobs", {"n": 3}), ("other", {"n": 4}), p.build("jobs", {"n": 5})])
            pull.rcvtimeo = 5000
            frames = [pull.recv() for _ in ids]
            assert [f.split(b"\0")[0] for f in frames] == [b"jobs", b"other", b"jobs"]
    finally:
        pull.close(0)
        ctx.term()


def test_a_payload_with_a_nul_goes_out_alone_and_a_full_pipe_says_how_many_went() -> None:
    # the portable layer only packs its own JSON (never a NUL); the driver still checks
    import mqprimer
    from mqprimer.backend import Queue

    port = _port()
    ctx, pull = _raw_pull(port)
    try:
        with mqprimer.connect(f"zmq+tcp://127.0.0.1:{port}?bind=producer&hwm=1&send_timeout=0.3") as conn:
            conn.producer().send("jobs", {"n": 0})
            assert pull.recv().startswith(b"jobs\0")
            backend = conn.endpoints[0].backend
            assert backend is not None
            send = backend.batch_publisher(Queue("jobs"))
            assert send is not None
            send([b'{"a":1}', b'{"b":\x002}', b'{"c":3}'])
            assert [pull.recv() for _ in range(3)] == [b'jobs\0{"a":1}', b'jobs\0{"b":\x002}', b'jobs\0{"c":3}']
            pull.close(0)  # nobody reads: the pipe fills and a frame times out
            with pytest.raises(Exception, match=r"send_timeout=0.3s.*\(\d+ of this batch's 100000 were sent\)") as e:
                send([b'{"n":1}'] * 100_000)
            sent = int(str(e.value).rpartition("(")[2].split()[0])
            assert sent % 128 == 0 and sent < 100_000, sent  # whole frames of 128 went, the rest did not
    finally:
        pull.close(0)
        ctx.term()
