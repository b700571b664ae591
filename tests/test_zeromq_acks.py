"""ZeroMQ plain mode: receive and ack without the consumer's lock (Subscription.lockfree_*).

An ack there is one atomic pop from the subscription's unsettled deliveries, and a poll is
buffer pops and dict stores, so both run without the lock that orders them against
Consumer.close. These tests put a close exactly in the window the lock used to shut, and
hold the outcome to the locked path's: nothing lost, nothing acked comes again.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(30)


def _port() -> int:
    from conftest import free_port_pair

    return free_port_pair()


def test_an_ack_overtaken_by_a_close_fails_and_the_message_comes_again() -> None:
    import mqprimer
    from mqprimer.errors import ConnectionFailed

    with mqprimer.connect(f"zmq+tcp://127.0.0.1:{_port()}") as conn:
        p = conn.producer()
        ids = [p.send("jobs", {"n": i}) for i in range(3)]
        c = conn.consumer("jobs")
        got = [c.receive(timeout=5) for _ in ids]
        assert [m.id if m else None for m in got] == ids
        got[0].ack()  # type: ignore[union-attr]  # the lock-free ack
        s = c._single
        assert s is not None and s.sub is not None and s.sub.lockfree_ack is not None
        sub, pop = s.sub, s.sub.lockfree_ack

        def overtaken(d: object) -> object:
            with s.lock:  # what Consumer.close does to the subscription, landing inside the ack
                s.sub = None
                sub.close()
            return pop(d)  # type: ignore[arg-type,misc]

        sub.lockfree_ack = overtaken  # type: ignore[assignment]
        with pytest.raises(ConnectionFailed, match="deliver it again"):
            got[1].ack()  # type: ignore[union-attr]
        assert got[1].settled  # type: ignore[union-attr]  # lost with its subscription, as the locked path marks it
        # the close gave back both unsettled messages, in their order; the acked one stays gone
        with conn.consumer("jobs") as again:
            later = [again.receive(timeout=5) for _ in range(2)]
            assert [m.id if m else None for m in later] == ids[1:]
            assert again.receive(timeout=0.2) is None, "an acked message came again"
        c.close()


def test_a_poll_overtaken_by_a_close_hands_out_nothing_and_loses_nothing() -> None:
    import mqprimer

    with mqprimer.connect(f"zmq+tcp://127.0.0.1:{_port()}") as conn:
        p = conn.producer()
        ids = [p.send("jobs", {"n": 0}), p.send("jobs", {"n": 1}, headers={"k": "v"})]
        c = conn.consumer("jobs")
        first = c.receive(timeout=5)  # reads both from the socket into this process's buffer
        assert first is not None and first.id == ids[0]
        first.ack()
        s = c._single
        assert s is not None and s.sub is not None and s.sub.lockfree_receive
        sub = s.sub
        # the driver's own check: a poll once close has begun takes nothing
        sub.close()
        assert sub.receive(0.0) is None
        sub.closed = False
        poll = sub.receive

        def overtaken(timeout: float | None) -> object:
            d = poll(timeout)  # registered as unsettled, then a close lands before the consumer wraps it
            with s.lock:
                s.sub = None
                sub.close()
            return d

        sub.receive = overtaken  # type: ignore[method-assign,assignment]
        # a message with headers takes the locked wrap, which must see the close and hand out nothing
        assert c.receive(timeout=0) is None, "a message the close gave back was handed out too"
        with conn.consumer("jobs") as again:
            later = again.receive(timeout=5)
            assert later is not None and later.id == ids[1], "a message was lost"
            assert later.headers == {"k": "v"}
            assert again.receive(timeout=0.2) is None
        c.close()


@pytest.mark.parametrize("scheme", ["zmq", "memory"])
def test_a_fast_path_message_pending_at_close_is_returned_as_a_listed_one_is(scheme: str) -> None:
    # the receive fast path's messages are not listed in the consumer's _pending (close marks
    # the listed ones RETURNED): each finds that out itself, whatever it is asked first
    import mqprimer
    from mqprimer.errors import StateError

    url = f"zmq+tcp://127.0.0.1:{_port()}" if scheme == "zmq" else "memory://returned"
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        ids = [p.send("jobs", {"n": i}) for i in range(6)]
        c = conn.consumer("jobs")
        got = [c.receive(timeout=5) for _ in ids]
        assert [m.id if m else None for m in got] == ids
        acked, *pending = [m for m in got if m is not None]
        # (the first may come the slow way, from the socket read that waits)
        assert not any(m in c._pending for m in pending), "not the fast path's (unlisted) messages: this proves nothing"
        acked.ack()
        assert not pending[0].settled
        c.close()
        returned = r"already settled \(returned to the broker\)"
        # each one's first question after the close
        with pytest.raises(StateError, match=returned):
            pending[0].ack()
        with pytest.raises(StateError, match=returned):
            pending[1].retry()
        with pytest.raises(StateError, match=returned):
            pending[2].dead_letter("x")
        with pytest.raises(StateError, match=returned):
            pending[3].touch()
        assert pending[4].settled and "returned to the broker" in repr(pending[4])
        assert acked.settled and "acked" in repr(acked)
        with pytest.raises(StateError, match=r"already settled \(acked\)"):
            acked.ack()
        with conn.consumer("jobs") as again:
            later = [again.receive(timeout=5) for _ in pending]
            assert [m.id if m else None for m in later] == ids[1:], "a returned message did not come again"
            for m in later:
                m.ack()  # type: ignore[union-attr]
            assert again.receive(timeout=0.2) is None, "an acked message came again"
