"""sqlite:// beyond the conformance suite: real processes on one file, crashes, restarts, bad files."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

import mqprimer
from mqprimer import Status, Topic
from mqprimer.testing.helpers import collect, wait_until

pytestmark = pytest.mark.timeout(120)

PRODUCER = """
import sys, mqprimer
url, n, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with mqprimer.connect(url) as c:
    p = c.producer()
    for i in range(n):
        print(p.send("work", {"producer": tag, "i": i}))
"""

CONSUMER = """
import os, sys, mqprimer
url, stop, prefetch = sys.argv[1], sys.argv[2], int(sys.argv[3])
with mqprimer.connect(url) as c, c.consumer("work", prefetch=prefetch) as cons:
    while True:
        m = cons.receive(timeout=0.2)
        if m is None:
            if os.path.exists(stop):
                break
            continue
        m.ack()
        print(m.id)
"""

# reserves messages without settling them, says which, then waits to be killed
HOLDER = """
import sys, time, mqprimer
url, n = sys.argv[1], int(sys.argv[2])
c = mqprimer.connect(url)
cons = c.consumer("work", prefetch=n)
print("before", time.time(), flush=True)
held = [cons.receive(timeout=10) for _ in range(n)]
print("held", " ".join(m.id for m in held), flush=True)
time.sleep(300)
"""


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> list[str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}): {err[-2000:]}"
    return out.split()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mq.db"


def test_several_producer_and_consumer_processes_lose_nothing_and_ack_once(url: str, tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    consumers = [_python(CONSUMER, url, str(stop), str(prefetch)) for prefetch in (1, 10, 50)]
    producers = [_python(PRODUCER, url, "300", f"p{i}") for i in range(3)]
    try:
        sent = [mid for p in producers for mid in _finish(p)]
        stop.touch()
        acked = [[mid for mid in _finish(c)] for c in consumers]
    finally:
        for p in producers + consumers:
            p.kill()
            p.wait()
    assert len(sent) == 900 and len(set(sent)) == 900
    counts = Counter(mid for got in acked for mid in got)
    assert set(counts) == set(sent), f"{len(set(sent) - set(counts))} messages lost"
    assert [mid for mid, n in counts.items() if n > 1] == [], "a message was acked twice"
    with mqprimer.connect(url) as conn, conn.consumer("work") as c:
        assert c.receive(timeout=0.3) is None


def test_messages_of_a_killed_consumer_come_back_after_the_visibility_timeout(tmp_path: Path) -> None:
    vt = 1.5
    url = f"sqlite:///{tmp_path}/mq.db?visibility_timeout={vt}"
    with mqprimer.connect(url) as conn:
        sent = [conn.producer().send("work", {"i": i}) for i in range(5)]
        holder = _python(HOLDER, url, "3")
        try:
            assert holder.stdout is not None
            before = float(holder.stdout.readline().split()[1])
            line = holder.stdout.readline().split()
            assert line[:1] == ["held"], holder.stderr.read() if holder.stderr else ""
            held = line[1:]
            assert held == sent[:3]
            assert all(conn.status(mid) is Status.RESERVED for mid in held)
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=10)
        finally:
            holder.kill()
            holder.wait()
        with conn.consumer("work", prefetch=10) as c:
            first = collect(c, 2)
            assert [m.id for m in first] == sent[3:] and [m.attempt for m in first] == [1, 1]
            again = collect(c, 3, timeout=vt + 10)
            arrived = time.time()
            assert c.receive(timeout=0.3) is None
        assert [m.id for m in again] == held
        assert arrived >= before + vt, "redelivered before the visibility timeout ran out"
        # the lost delivery counts, so a message that crashes its consumer cannot loop for ever
        assert [m.attempt for m in again] == [2, 2, 2]
        assert all(conn.status(mid) is Status.DONE for mid in sent)


@pytest.mark.parametrize("case", ["directory", "file-in-the-way", "not-a-database"])
def test_a_file_that_cannot_be_opened_fails_clearly_and_fast(tmp_path: Path, case: str) -> None:
    if case == "directory":
        path, expected = tmp_path, "it is a directory"
    elif case == "file-in-the-way":
        (tmp_path / "plain").write_text("x")
        path, expected = tmp_path / "plain" / "mq.db", "not a directory"
    else:
        path = tmp_path / "junk.db"
        path.write_bytes(b"this is not an sqlite file" * 100)
        expected = "file is not a database"
    start = time.monotonic()
    error = mqprimer.BrokerError if case == "not-a-database" else mqprimer.ConnectionFailed
    with pytest.raises(error) as info:
        mqprimer.connect(f"sqlite:///{path}")
    assert time.monotonic() - start < 5
    assert expected in str(info.value)
    if case != "not-a-database":
        assert str(path) in str(info.value)


def test_restart_keeps_unsettled_and_buffered_messages(url: str) -> None:
    with mqprimer.connect(url) as conn:
        sent = [conn.producer().send("work", i, priority=i % 3) for i in range(6)]
        c = conn.consumer("work", prefetch=4)
        held = c.receive(timeout=5)
        assert held is not None
    # the closed connection gave back the held message and the three buffered ones at once
    with mqprimer.connect(url) as conn, conn.consumer("work", prefetch=10) as c:
        got = collect(c, 6, timeout=5)
        assert c.receive(timeout=0.3) is None
    assert sorted(m.id for m in got) == sorted(sent)
    assert [m.body for m in got] == [2, 5, 1, 4, 0, 3]  # priority, then sending order
    assert all(m.attempt == 1 for m in got), "a message given back on close is not a failed attempt"


def test_messages_survive_a_producer_process_that_exits(url: str) -> None:
    sent = _finish(_python(PRODUCER, url, "20", "gone"))
    with mqprimer.connect(url) as conn, conn.consumer("work", prefetch=5) as c:
        assert [m.id for m in collect(c, 20)] == sent


def test_durable_subscription_keeps_messages_private_one_is_removed(url: str, tmp_path: Path) -> None:
    with mqprimer.connect(url) as conn:
        conn.consumer(Topic("logs.#"), subscription="audit").close()
        private = conn.consumer(Topic("logs.*"))
        conn.producer().send(Topic("logs.warning"), "for both")
        collect(private, 1, ack=False)[0].dead_letter("its dead letters go with it")
        private.close()
        conn.producer().send(Topic("logs.error"), "while nobody listens")
    db = sqlite3.connect(tmp_path / "mq.db")
    try:
        assert db.execute("SELECT name FROM mq_subscriptions").fetchall() == [("audit",)]
        assert db.execute("SELECT DISTINCT queue FROM mq_messages").fetchall() == [("audit",)]
    finally:
        db.close()
    with mqprimer.connect(url) as conn, conn.consumer(Topic("logs.#"), subscription="audit") as c:
        assert [m.body for m in collect(c, 2)] == ["for both", "while nobody listens"]


def test_private_subscription_of_a_dead_process_is_reaped(url: str, tmp_path: Path) -> None:
    code = """
import sys, mqprimer
c = mqprimer.connect(sys.argv[1])
c.consumer(mqprimer.Topic("logs.#"))
import os; os._exit(0)  # no close: as if killed
"""
    _finish(_python(code, url))
    db = sqlite3.connect(tmp_path / "mq.db", isolation_level=None)
    try:
        [(name,)] = db.execute("SELECT name FROM mq_subscriptions").fetchall()
        with mqprimer.connect(url) as conn:
            conn.producer().send(Topic("logs.x"), "kept while the lease runs")
        assert db.execute("SELECT count(*) FROM mq_messages WHERE queue = ?", (name,)).fetchone() == (1,)
        db.execute("UPDATE mq_subscriptions SET lease_until = 1")  # as if its lease ran out long ago
        mqprimer.connect(url).close()  # opening runs the housekeeping
        assert db.execute("SELECT count(*) FROM mq_subscriptions").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM mq_messages").fetchone() == (0,)
    finally:
        db.close()


@pytest.mark.parametrize("how", ["ack", "touch"])
def test_settling_after_the_reservation_lapsed_is_an_error(tmp_path: Path, how: str) -> None:
    url = f"sqlite:///{tmp_path}/mq.db?visibility_timeout=0.2"
    with mqprimer.connect(url) as conn, mqprimer.connect(url) as other:
        mid = conn.producer().send("work", "slow")
        with conn.consumer("work") as slow, other.consumer("work") as fast:
            m = slow.receive(timeout=5)
            assert m is not None
            wait_until(lambda: conn.status(mid) is Status.READY, what="the reservation to lapse")
            again = fast.receive(timeout=5)
            assert again is not None and again.id == mid and again.attempt == 2
            with pytest.raises(mqprimer.BrokerError, match="reservation ran out"):
                getattr(m, how)()
            if how == "touch":
                with pytest.raises(mqprimer.StateError):
                    m.ack()  # lost with its lease
            again.ack()
        assert conn.status(mid) is Status.DONE


def test_touch_keeps_a_reservation_past_its_visibility_timeout(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/mq.db?visibility_timeout=1"
    with mqprimer.connect(url) as conn, mqprimer.connect(url) as other:
        mid = conn.producer().send("work", "slow")
        with conn.consumer("work") as slow, other.consumer("work") as fast:
            assert slow.delivery_lease == 1.0
            m = slow.receive(timeout=5)
            assert m is not None
            # touched when a quarter of the lease is gone: a stall of up to ~0.7 s on a busy
            # machine still leaves the lease running
            end = time.monotonic() + 2.5  # two and a half visibility timeouts
            touched = 0.0
            while time.monotonic() < end:
                if time.monotonic() - touched >= 0.25:
                    m.touch()
                    touched = time.monotonic()
                assert fast.receive(timeout=0.05) is None, "the touched message went to another consumer"
                assert conn.status(mid) is Status.RESERVED
            m.ack()  # still ours: without the touches this raises "reservation ran out"
        assert conn.status(mid) is Status.DONE


def test_status_remembers_a_bounded_number_of_settled_ids(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/mq.db?status_keep=5"
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        ids = [p.send("work", i) for i in range(20)]
        dead = p.send("work", "bad")
        with conn.consumer("work", prefetch=30) as c:
            for m in collect(c, 21, ack=False):
                if m.id == dead:
                    m.dead_letter("bad")
                else:
                    m.ack()
        assert conn.status(dead) is Status.DEAD
        assert conn.status(ids[-1]) is Status.DONE
    with mqprimer.connect(url) as conn:  # opening runs the housekeeping
        assert [conn.status(i) for i in ids[:15]] == [Status.UNKNOWN] * 15
        assert [conn.status(i) for i in ids[15:]] == [Status.DONE] * 5
        assert conn.status(dead) is Status.DEAD


def test_relative_path_creates_directories_and_options_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with mqprimer.connect("sqlite:///deep/er/mq.db?synchronous=full&busy_timeout=2") as conn:
        conn.producer().send("work", 1)
        backend = conn.endpoints[0].backend
        assert backend is not None
        db = backend.db  # type: ignore[attr-defined]
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert (tmp_path / "deep" / "er" / "mq.db").is_file()
    for bad in ("synchronous=off", "visibility_timeout=0", "nonsense=1"):
        with pytest.raises(mqprimer.ConfigurationError):
            mqprimer.connect(f"sqlite:///deep/er/mq.db?{bad}")


def test_default_url_is_a_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MQPRIMER_URL", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    with mqprimer.connect() as conn:
        assert conn.capabilities.name == "sqlite" and conn.capabilities.persistent
        conn.producer().send("work", "x")
    assert (tmp_path / "mqprimer" / "default.db").is_file()
    assert os.environ.get("MQPRIMER_URL") is None



def test_threads_that_open_a_fresh_file_at_the_same_moment_all_connect(tmp_path: Path) -> None:
    # seen in CI: a web app and its two workers opening the default file together, one got
    # "database is locked" at once (sqlite skips its busy handler there): 8 rounds in 200 before the fix
    failed: list[str] = []
    for round_ in range(300):
        url = f"sqlite:///{tmp_path}/{round_}/fresh.db"
        barrier = threading.Barrier(3)

        def open_close(url: str = url, barrier: threading.Barrier = barrier, round_: int = round_) -> None:
            barrier.wait()
            try:
                mqprimer.connect(url).close()
            except mqprimer.MQError as exc:
                failed.append(f"round {round_}: {exc}")

        threads = [threading.Thread(target=open_close) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert failed == []
