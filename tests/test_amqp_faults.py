"""AMQP under faults on the harness's real RabbitMQ: SIGKILL and restart of the broker in
the middle of a stream, a consumer process SIGKILLed holding messages, a frozen broker.

These tests stop the shared broker; each one brings it back (and waits until it answers)
before it ends, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest

import mqprimer
from conftest import ROOT, need_broker
from mqprimer import ConnectionFailed
from mqprimer.testing.helpers import collect, wait_until
from mqprimer.url import URL

RUN = Path(os.environ.get("MQPRIMER_RUN_DIR", ROOT / ".run" / "brokers"))


def _brokers(*args: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "brokers"), *args], check=True, timeout=150,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _node_pid() -> int:
    return int((RUN / "rabbitmq" / "rabbitmq.pid").read_text().strip())


def _state(pid: int) -> str:
    """The process state letter from /proc (T = stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _with(url: str, **params: str) -> str:
    return URL.parse(url).with_query(**params).render(hide_password=False)


@pytest.fixture
def url() -> str:
    return need_broker("amqp")


@pytest.fixture
def queue(url: str) -> Iterator[str]:
    """A fresh queue, deleted afterwards: fewer durable queues = faster recovery after a kill."""
    name = f"af{uuid.uuid4().hex[:12]}"
    yield name
    u = URL.parse(url)
    try:
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            u.host, u.port, "/", pika.PlainCredentials(u.username or "", u.password or "")))
        conn.channel().queue_delete(name)
        conn.close()
    except pika.exceptions.AMQPError:
        pass


@pytest.fixture
def broker_back(url: str) -> Iterator[None]:
    """Whatever the test did to the node (kill, SIGSTOP), it is running and answering after."""
    yield
    try:
        os.kill(_node_pid(), signal.SIGCONT)
    except (OSError, ValueError):
        pass
    _brokers("up", "rabbitmq")
    mqprimer.connect(url).close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_broker_sigkill_mid_stream_loses_no_confirmed_message(url: str, queue: str, broker_back: None) -> None:
    n, batch = 10_000, 100
    confirmed: list[str] = []
    received: list[str] = []
    produced = threading.Event()
    failures: list[BaseException] = []
    fault: dict[str, float | str] = {}

    def consume() -> None:
        try:
            with mqprimer.connect(url, reconnect_timeout=120) as cc, cc.consumer(queue, prefetch=100) as c:
                deadline = None
                while True:
                    if produced.is_set():
                        if set(received) >= set(confirmed):
                            return
                        deadline = deadline or time.monotonic() + 60
                        if time.monotonic() > deadline:
                            return
                    m = c.receive(timeout=0.5)
                    if m is not None:
                        received.append(m.id)
                        try:
                            m.ack()
                        except ConnectionFailed:
                            pass  # received just before the kill: it cannot be settled, RabbitMQ redelivers it
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def kill_and_restart() -> None:
        try:
            _brokers("kill", "rabbitmq")
            start = time.monotonic()
            try:
                mqprimer.connect(url).close()
                fault["down_connect"] = "connected to a killed broker?"
            except ConnectionFailed as exc:
                fault["down_connect"] = f"{type(exc).__name__} after {time.monotonic() - start:.2f}s"
            start = time.monotonic()
            _brokers("up", "rabbitmq")
            fault["restart_s"] = time.monotonic() - start
        except BaseException as exc:
            failures.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    killer = threading.Thread(target=kill_and_restart, daemon=True)
    with mqprimer.connect(url, reconnect_timeout=120) as conn:
        p = conn.producer()
        for i in range(0, n, batch):
            items = [p.build(queue, {"i": j}) for j in range(i, i + batch)]
            p.send_many(items)  # returns once RabbitMQ confirmed all of them (resent after the restart)
            confirmed.extend(it.message_id for it in items)
            if len(confirmed) == 3000:
                killer.start()
    produced.set()
    killer.join(150)
    consumer.join(150)
    assert not failures, failures
    assert str(fault["down_connect"]).startswith("ConnectionFailed"), fault
    lost = set(confirmed) - set(received)
    duplicates = len(received) - len(set(received))
    print(f"\nAMQP broker SIGKILL at 3000/{n}: restart {fault['restart_s']:.1f}s, connect while down: "
          f"{fault['down_connect']}; confirmed {len(confirmed)}, received {len(received)}, "
          f"lost {len(lost)}, duplicates {duplicates}")
    assert len(set(confirmed)) == n
    assert not lost, f"{len(lost)} confirmed messages lost"


_HOLDER = """
import json, sys, time, mqprimer
conn = mqprimer.connect(sys.argv[1])
c = conn.consumer(sys.argv[2], prefetch=50)
held = []
while len(held) < int(sys.argv[3]):
    m = c.receive(timeout=10)
    if m is None:
        break
    held.append(m.id)
print(json.dumps(held), flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(90)
def test_consumer_process_sigkilled_holding_unacked_messages_gets_them_redelivered(url: str, queue: str) -> None:
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        sent = p.send_many([(queue, {"i": i}) for i in range(20)])
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, url, queue, "20"],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        try:
            assert proc.stdout is not None
            held = json.loads(proc.stdout.readline() or "[]")
            assert sorted(held) == sorted(sent), "the holder did not get every message"
            with conn.consumer(queue) as c:
                assert c.receive(timeout=0.5) is None, "held messages must not go to anyone else"
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            proc.kill()
        with conn.consumer(queue, prefetch=50) as c:
            again = [m.id for m in collect(c, 20, timeout=30)]
            assert c.receive(timeout=0.3) is None
        assert sorted(again) == sorted(sent)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_frozen_broker_gives_clear_errors_within_the_configured_timeouts(url: str, queue: str,
                                                                         broker_back: None) -> None:
    fast = _with(url, heartbeat="1", connect_timeout="2")
    # pika notices silence after heartbeat + 5 s, checked every heartbeat + 5 s: at most 12 s here
    limit = 2 * (1 + 5) + 3 + 2 * 2 + 3  # + reconnect_timeout, an attempt begun just before it ends, slack
    with mqprimer.connect(fast, reconnect_timeout=3) as conn:
        p = conn.producer()
        p.send(queue, "before")
        c = conn.consumer(queue)
        assert [m.body for m in collect(c, 1)] == ["before"]
        pid = _node_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: _state(pid) == "T", timeout=5, what=f"the broker (pid {pid}) to stop")
            start = time.monotonic()
            with pytest.raises(ConnectionFailed) as sent_err:
                p.send(queue, "during")
            send_s = time.monotonic() - start
            start = time.monotonic()
            with pytest.raises(ConnectionFailed) as recv_err:
                while time.monotonic() - start < 60:
                    c.receive(timeout=1)
            recv_s = time.monotonic() - start
        finally:
            os.kill(pid, signal.SIGCONT)
        c.close()
        print(f"\nfrozen broker: send failed after {send_s:.1f}s ({sent_err.value}); "
              f"receive failed after {recv_s:.1f}s ({recv_err.value})")
        assert send_s < limit and recv_s < limit
        assert "***" in str(sent_err.value) and "mqprimer-secret" not in str(sent_err.value)
        # the same connection recovers once the broker runs again
        mid = p.send(queue, "after")
        with conn.consumer(queue) as c2:
            got = {m.id: m.body for m in collect(c2, 1)}
            while (m := c2.receive(timeout=0.5)) is not None:  # "during" may have been stored
                got[m.id] = m.body
                m.ack()
        assert got.get(mid) == "after" and set(got.values()) <= {"after", "during"}
