"""High availability on two real beanstalkd servers (the harness's ``beanstalk-ha`` URL).

A URL listing several hosts gives a producer that fails over to the next server and a
consumer that consumes from all of them, settling each message on the server it came from.
Mid-stream failover (server ``a`` refusing connections) and a SIGKILL of both servers are in
the reliability battery (tests/test_battery.py, id ``beanstalk-ha``).
"""

from __future__ import annotations

import threading
import uuid

import pytest

import mqprimer
from conftest import need_broker
from mqprimer import Status
from mqprimer.testing.helpers import collect
from test_beanstalk import raw, tube_stats

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ha_url() -> str:
    return need_broker("beanstalk-ha")


@pytest.fixture
def q() -> str:
    return f"ha{uuid.uuid4().hex[:10]}"


def single(ha_url: str, i: int) -> str:
    """The URL of one server of the HA list."""
    return ha_url.replace(ha_url.split("://", 1)[1], ha_url.split("://", 1)[1].split(",")[i])


def test_consumer_takes_from_every_server_and_settles_on_the_origin(ha_url: str, q: str) -> None:
    sent: dict[str, int] = {}
    for i in (0, 1):
        with mqprimer.connect(single(ha_url, i)) as one:
            p = one.producer()
            for n in range(20):
                sent[p.send(q, {"server": i, "n": n})] = i
    with mqprimer.connect(ha_url) as conn:
        assert conn.status(next(m for m, i in sent.items() if i == 1)) is Status.READY, "status asks every server"
        with conn.consumer(q, prefetch=10) as c:
            got = collect(c, 40, ack=False)
            assert {m.id for m in got} == set(sent)
            dead = {i: next(m for m in got if m.body["server"] == i) for i in (0, 1)}
            for m in got:
                if m in dead.values():
                    m.dead_letter(f"from server {m.body['server']}")
                elif m.body["n"] % 2:
                    m.retry()
                else:
                    m.ack()
            n_retried = sum(1 for m in got if m not in dead.values() and m.body["n"] % 2)
            retried = collect(c, n_retried)
            assert all(m.attempt == 2 for m in retried) and c.receive(timeout=0.3) is None
        listed = conn.dead_letters(q).list()
        assert sorted(e.reason or "" for e in listed) == ["from server 0", "from server 1"]
    for i in (0, 1):  # each dead letter is buried on the server its message came from
        assert tube_stats(raw(ha_url, i), f"{q}.dead")["buried"] == 1
        assert tube_stats(raw(ha_url, i), q) == {"ready": 0, "reserved": 0, "buried": 0, "delayed": 0}


@pytest.mark.timeout(60)
def test_worker_on_two_servers_handles_everything_once(ha_url: str, q: str) -> None:
    from mqprimer.worker import EXIT_RECYCLE, Worker

    sent: set[str] = set()
    for i in (0, 1):
        with mqprimer.connect(single(ha_url, i)) as one:
            p = one.producer()
            sent |= {p.send(q, {"server": i, "n": n}) for n in range(30)}
            poison = p.send(q, "poison") if i == 1 else None
    handled: list[str] = []
    lock = threading.Lock()

    def handler(m: mqprimer.Message) -> None:
        if m.body == "poison":
            raise ValueError("bad input")
        with lock:
            handled.append(m.id)

    worker = Worker(ha_url, q, handler, concurrency=4, max_messages=62, handle_signals=False,
                    retry=mqprimer.RetryPolicy(max_attempts=2, initial_delay=0, jitter=0))
    assert worker.run() == EXIT_RECYCLE  # 60 good + the poison twice, then recycled
    assert sorted(handled) == sorted(sent)
    with mqprimer.connect(ha_url) as conn:
        [dead] = conn.dead_letters(q).list()
        assert dead.id == poison and dead.attempt == 2 and "ValueError: bad input" in (dead.reason or "")
