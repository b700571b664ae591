"""The Worker runtime in-process, on the memory and sqlite backends (real queues, no mocks)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mqprimer
from mqprimer import DeadLetter, Retry, RetryPolicy
from mqprimer.testing.helpers import wait_until
from mqprimer.worker import EXIT_OK, EXIT_RECYCLE, Outcome, Worker

FAST = RetryPolicy(max_attempts=3, initial_delay=0.01, multiplier=1.0, jitter=0.0)


@pytest.fixture
def url() -> str:
    return f"memory://w{uuid.uuid4().hex[:8]}"


@pytest.fixture
def conn(url: str) -> Iterator[mqprimer.Connection]:
    c = mqprimer.connect(url)
    yield c
    c.close()


def start(worker: Worker) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    t.start()
    return t, codes


def finish(worker: Worker, t: threading.Thread, codes: list[int]) -> int:
    worker.stop()
    t.join(15)
    assert not t.is_alive(), "worker did not stop"
    return codes[0]


def test_outcomes_ack_retry_dead_letter(url: str, conn: mqprimer.Connection) -> None:
    seen: list[tuple[Any, int]] = []

    def handle(m: mqprimer.Message) -> None:
        seen.append((m.body, m.attempt))
        if m.body == "retry-once" and m.attempt == 1:
            raise Retry(delay=0.01)
        if m.body == "dead":
            raise DeadLetter("bad image")
        if m.body == "boom":
            raise KeyError("no such field")

    p = conn.producer()
    ids = {b: p.send("jobs", b) for b in ("ok", "retry-once", "dead", "boom")}
    w = Worker(url, "jobs", handle, retry=FAST, handle_signals=False)
    t, codes = start(w)
    wait_until(lambda: w.handled >= 1 + 2 + 1 + 3, what="every outcome")
    assert finish(w, t, codes) == EXIT_OK
    assert w.stats == {"ack": 2, "retry": 3, "dead-letter": 2, "lost": 0}
    assert sorted(a for b, a in seen if b == "boom") == [1, 2, 3]  # retried by policy, then dead letter
    dead = {e.id: e for e in conn.dead_letters("jobs").list(10)}
    assert set(dead) == {ids["dead"], ids["boom"]}
    assert dead[ids["dead"]].reason == "bad image"
    assert dead[ids["boom"]].reason == "gave up after 3 attempt(s): KeyError: 'no such field'"
    assert conn.status(ids["ok"]) is mqprimer.Status.DONE


def test_a_slow_retry_never_blocks_other_messages(url: str, conn: mqprimer.Connection) -> None:
    done: list[str] = []

    def handle(m: mqprimer.Message) -> None:
        if m.body == "later" and m.attempt == 1:
            raise Retry(delay=30)
        done.append(m.body)

    p = conn.producer()
    later = p.send("jobs", "later")
    for i in range(5):
        p.send("jobs", f"n{i}")
    w = Worker(url, "jobs", handle, handle_signals=False)
    t, codes = start(w)
    wait_until(lambda: len(done) == 5, what="the 5 other messages")
    assert finish(w, t, codes) == EXIT_OK
    assert "later" not in done
    assert conn.status(later) is mqprimer.Status.DELAYED


def test_concurrency_runs_handlers_in_parallel_and_prefetch_bounds_in_flight(
    url: str, conn: mqprimer.Connection
) -> None:
    lock = threading.Lock()
    active = peak = 0
    gate = threading.Event()

    def handle(m: mqprimer.Message) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        gate.wait(5)
        with lock:
            active -= 1

    p = conn.producer()
    for i in range(20):
        p.send("jobs", i)
    w = Worker(url, "jobs", handle, concurrency=4, prefetch=6, handle_signals=False)
    t, codes = start(w)
    wait_until(lambda: peak == 4, what="4 handlers at once")
    wait_until(lambda: w._inflight == 6, what="prefetch filled")
    time.sleep(0.2)  # give the worker the chance to over-fetch; it must not
    assert w._inflight == 6 and peak == 4
    gate.set()
    wait_until(lambda: w.handled == 20, what="all 20 handled")
    assert finish(w, t, codes) == EXIT_OK
    assert peak == 4


def test_recycle_after_max_messages_handles_exactly_that_many(url: str, conn: mqprimer.Connection) -> None:
    p = conn.producer()
    for i in range(10):
        p.send("jobs", i)
    got: list[int] = []
    w = Worker(url, "jobs", lambda m: got.append(m.body), max_messages=4, prefetch=10, handle_signals=False)
    assert w.run() == EXIT_RECYCLE
    assert got == [0, 1, 2, 3]
    with conn.consumer("jobs") as c:
        rest = [c.receive(timeout=1) for _ in range(6)]
    assert [m.body for m in rest if m] == [4, 5, 6, 7, 8, 9]


def test_recycle_after_max_time_and_max_memory(url: str) -> None:
    w = Worker(url, "jobs", lambda m: None, max_time=0.3, handle_signals=False)
    start_t = time.monotonic()
    assert w.run() == EXIT_RECYCLE
    assert 0.3 <= time.monotonic() - start_t < 5
    tiny = Worker(url, "jobs", lambda m: None, max_memory=1.0, handle_signals=False)  # any process is over 1 MiB
    assert tiny.run() == EXIT_RECYCLE


def test_stop_gives_back_messages_not_started(url: str, conn: mqprimer.Connection) -> None:
    started = threading.Event()
    release = threading.Event()

    def handle(m: mqprimer.Message) -> None:
        started.set()
        release.wait(5)

    p = conn.producer()
    for i in range(5):
        p.send("jobs", i)
    w = Worker(url, "jobs", handle, prefetch=5, handle_signals=False)
    t, codes = start(w)
    assert started.wait(5)
    wait_until(lambda: w._inflight == 5, what="prefetch filled")
    w.stop()
    release.set()
    t.join(10)
    assert codes == [EXIT_OK]
    assert w.stats["ack"] == 1  # the one in the handler finished and was acked
    with conn.consumer("jobs") as c:
        back = [c.receive(timeout=1) for _ in range(4)]
    assert sorted(m.body for m in back if m) == [1, 2, 3, 4]


def test_hooks_see_every_message_and_a_failing_hook_is_harmless(url: str, conn: mqprimer.Connection) -> None:
    before: list[str] = []
    after: list[Outcome] = []

    def bad_hook(m: mqprimer.Message) -> None:
        before.append(m.id)
        raise RuntimeError("metrics backend down")

    def handle(m: mqprimer.Message) -> None:
        if m.body == "x":
            raise DeadLetter("no")

    p = conn.producer()
    a, b = p.send("jobs", "ok"), p.send("jobs", "x")
    w = Worker(url, "jobs", handle, before=bad_hook, after=lambda m, o: after.append(o), handle_signals=False)
    t, codes = start(w)
    wait_until(lambda: len(after) == 2, what="after hooks")
    finish(w, t, codes)
    assert before == [a, b]
    assert [(o.message_id, o.outcome, o.attempt, o.destination) for o in after] == [
        (a, "ack", 1, "jobs"), (b, "dead-letter", 1, "jobs")]
    assert after[1].duration >= 0 and isinstance(after[1].error, DeadLetter)


def test_log_lines_are_structured_and_carry_no_body(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    with mqprimer.connect(url) as c:
        mid = c.producer().send("jobs", {"secret-body": "s3cr3t"})
    caplog.set_level("INFO", logger="mqprimer")
    w = Worker(url, "jobs", lambda m: None, max_messages=1, handle_signals=False)
    assert w.run() == EXIT_RECYCLE
    rec = [r for r in caplog.records if getattr(r, "mq", None)]
    assert len(rec) == 1
    assert rec[0].mq == {"id": mid, "destination": "jobs", "attempt": 1, "outcome": "ack",  # type: ignore[attr-defined]
                         "duration_ms": rec[0].mq["duration_ms"]}  # type: ignore[attr-defined]
    assert f"ack id={mid} destination=jobs attempt=1" in rec[0].getMessage()
    assert "s3cr3t" not in caplog.text


def test_password_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="mqprimer")
    w = Worker("memory://bob:hunter2@pw", "jobs", lambda m: None, max_time=0.2, handle_signals=False)
    assert w.run() == EXIT_RECYCLE
    assert "worker started" in caplog.text and "bob:***@pw" in caplog.text
    assert "hunter2" not in caplog.text


def test_unhandleable_body_is_dead_lettered_and_the_worker_keeps_going(url: str, conn: mqprimer.Connection) -> None:
    def handle(m: mqprimer.Message) -> None:
        int(m.body["n"])

    p = conn.producer()
    bad = p.send("jobs", "not a dict")
    good = p.send("jobs", {"n": "1"})
    w = Worker(url, "jobs", handle, retry=RetryPolicy(max_attempts=1), handle_signals=False)
    t, codes = start(w)
    wait_until(lambda: w.stats["ack"] == 1 and w.stats["dead-letter"] == 1, what="both settled")
    finish(w, t, codes)
    [dead] = conn.dead_letters("jobs").list(5)
    assert dead.id == bad and (dead.reason or "").startswith("gave up after 1 attempt(s): TypeError")
    assert conn.status(good) is mqprimer.Status.DONE


OUTAGE_WORKER = """
import sys, time
from mqprimer.worker import Worker

url, out = sys.argv[1], sys.argv[2]

def handle(m):
    with open(out, "a") as f:
        f.write(f"{m.body}\\n")
    time.sleep(0.05)

sys.exit(Worker(url, "jobs", handle, prefetch=1, reconnect_max=1.0,
                connect_options={"reconnect_timeout": 0.5}).run())
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_reconnects_after_a_real_outage_without_spinning(tmp_path: Path) -> None:
    """sqlite made unusable by another process's exclusive lock: the worker backs off and comes back.

    The worker runs in a process of its own, so that its CPU time is its own (the pytest
    process also runs whatever threads earlier tests left behind)."""
    path, out = tmp_path / "q.db", tmp_path / "handled"
    # busy_timeout=0: a locked file fails at once, so a worker that retried without backing
    # off would spin (measured here: ~0.8 s of CPU in the outage without the backoff, ~0 with it)
    url = f"sqlite:///{path}?busy_timeout=0&visibility_timeout=1"
    with mqprimer.connect(url) as c:
        p = c.producer()
        for i in range(30):
            p.send("jobs", i)

    def handled() -> list[int]:
        return [int(x) for x in out.read_text().split()] if out.exists() else []

    log = (tmp_path / "worker.log").open("wb")  # a file, not a pipe nobody reads: it would fill and block
    proc = subprocess.Popen([sys.executable, "-c", OUTAGE_WORKER, url, str(out)], stderr=log)
    try:
        wait_until(lambda: len(handled()) >= 3, what="first messages")
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        cpu0 = _cpu_seconds(proc.pid)
        stalled = len(handled())
        time.sleep(2.5)  # the outage itself: nothing can be reserved or settled meanwhile
        cpu = _cpu_seconds(proc.pid) - cpu0
        during = len(handled())
        db.execute("COMMIT")
        db.close()
        assert cpu < 0.25, f"the worker burned {cpu:.2f}s CPU during a 2.5s outage"
        assert during <= stalled + 1, "messages were handled while the database was locked"
        wait_until(lambda: set(handled()) == set(range(30)), timeout=20, what="every message after the outage")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == EXIT_OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        Worker("memory://", "q", lambda m: None, concurrency=0)
    with pytest.raises(TypeError, match="callable"):
        Worker("memory://", "q", "nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_memory"):
        Worker("memory://", "q", lambda m: None, max_memory=-5)


def test_worker_is_exposed_lazily_from_the_package() -> None:
    assert mqprimer.Worker is Worker


def test_worker_on_a_topic_pattern(url: str, conn: mqprimer.Connection) -> None:
    seen: list[str] = []
    w = Worker(url, mqprimer.Topic("logs.*"), lambda m: seen.append(m.body), handle_signals=False)
    t, codes = start(w)
    p = conn.producer()
    wait_until(lambda: p.send(mqprimer.Topic("logs.warm"), "warm") and "warm" in seen, what="subscribed")
    p.send(mqprimer.Topic("logs.error"), "e1")
    p.send(mqprimer.Topic("other.error"), "not for us")
    p.send(mqprimer.Topic("logs.info"), "i1")
    wait_until(lambda: "i1" in seen, what="topic messages")
    assert finish(w, t, codes) == EXIT_OK
    assert [s for s in seen if s != "warm"] == ["e1", "i1"]


def test_touch_leases_lets_a_handler_outlive_the_visibility_timeout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/mq.db?visibility_timeout=1.2"  # touched every 0.4 s
    calls: list[str] = []
    release = threading.Event()

    def slow(m: mqprimer.Message) -> None:
        calls.append(m.id)
        assert release.wait(30), "the test never released the handler"

    with mqprimer.connect(url) as conn:
        mid = conn.producer().send("long", "job")
        w = Worker(url, "long", slow, touch_leases=True, handle_signals=False)
        t, codes = start(w)
        try:
            wait_until(lambda: calls, what="the handler to start")
            with conn.consumer("long") as other:  # a second consumer must not get the message meanwhile
                end = time.monotonic() + 3.0  # two and a half visibility timeouts
                while time.monotonic() < end:
                    assert other.receive(timeout=0.2) is None, "the message left the worker while it ran"
        finally:
            release.set()
        wait_until(lambda: w.stats["ack"] == 1, what="the ack")
        assert finish(w, t, codes) == EXIT_OK
        assert calls == [mid] and conn.status(mid) is mqprimer.Status.DONE


def test_without_touch_leases_a_slow_handler_loses_its_message(tmp_path: Path) -> None:
    """The control of the test above: the lease really runs out without the touches."""
    url = f"sqlite:///{tmp_path}/mq.db?visibility_timeout=0.3"
    calls: list[int] = []
    release = threading.Event()

    def slow(m: mqprimer.Message) -> None:
        calls.append(m.attempt)
        assert release.wait(30), "the test never released the handler"

    with mqprimer.connect(url) as conn:
        conn.producer().send("long", "job")
        w = Worker(url, "long", slow, handle_signals=False)
        t, codes = start(w)
        try:
            wait_until(lambda: calls, what="the handler to start")
            with conn.consumer("long") as other:
                again = other.receive(timeout=10)  # the handler is still running: it holds no lease now
                assert again is not None and again.attempt >= 2
                again.ack()
        finally:
            release.set()
        wait_until(lambda: w.stats["lost"] >= 1, what="the worker to find its message lost")
        assert finish(w, t, codes) == EXIT_OK


def test_a_failure_the_backend_cannot_retry_or_dead_letter_stays_with_the_broker() -> None:
    """On a backend declaring retry and dead letters unsupported, a failing handler's message
    is neither dropped nor does it stop the worker: it goes back to the broker on close."""
    from mqprimer.testing.fake import fake_scheme

    url = f"fake://w{uuid.uuid4().hex[:8]}?unsupported=retry,dead_letter"
    with fake_scheme(), mqprimer.connect(url) as conn:
        p = conn.producer()
        bad, good = p.send("jobs", "boom"), p.send("jobs", "ok")

        def handle(m: mqprimer.Message) -> None:
            if m.body == "boom":
                raise ValueError("handler failed")

        w = Worker(url, "jobs", handle, retry=FAST, handle_signals=False)
        t, codes = start(w)
        wait_until(lambda: w.handled >= 2, what="both messages handled")
        assert finish(w, t, codes) == EXIT_OK
        assert w.stats == {"ack": 1, "retry": 0, "dead-letter": 0, "lost": 1}
        with conn.consumer("jobs") as c:
            m = c.receive(timeout=5)
            assert m is not None and m.id == bad and m.id != good, "the failed message was lost"
            m.ack()
            assert c.receive(timeout=0.2) is None
