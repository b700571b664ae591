"""sqlite:// through mqprimer.aio: sends, polls and acks run on the event loop through a
second connection that never waits for a lock (busy timeout 0) and never checkpoints; where
another connection holds the write lock they report "not done" at once and the twin's thread
path does them (waiting for the lock there), so nothing is lost or done twice."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mqprimer
import mqprimer.aio as aio
from mqprimer.aio import _nowait
from mqprimer.aio._runner import Runner
from mqprimer.backends._sqlite_db import LOOP_MAX_BATCH
from mqprimer.backends._sqlite_sub import SqliteSubscription
from mqprimer.producer import Producer

pytestmark = pytest.mark.timeout(60)

# takes the file's write lock for ~2 ms at a time, half of the time, until killed
LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
print("ready", flush=True)
while True:
    db.execute("BEGIN IMMEDIATE")
    time.sleep(0.002)
    db.execute("COMMIT")
    time.sleep(0.002)
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "mq.db"


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, Counter[str]]:
    """How often the twin's loop-side calls were done / not done, and its thread hops by name."""
    seen: dict[str, Counter[str]] = {"done": Counter(), "not done": Counter(), "hops": Counter()}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            r = fn(*args)
            seen["not done" if r is None or r is False else "done"][name] += 1
            return r

        return call

    monkeypatch.setattr(_nowait, "poll", wrap("poll", _nowait.poll))
    monkeypatch.setattr(_nowait, "ack", wrap("ack", _nowait.ack))
    monkeypatch.setattr(Producer, "send_nowait", wrap("send", Producer.send_nowait))
    put = Runner._put

    def counting(self: Runner, job: Any) -> None:
        seen["hops"][getattr(job.fn, "__name__", "?")] += 1
        put(self, job)

    monkeypatch.setattr(Runner, "_put", counting)
    return seen


async def _ticking(ticks: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        ticks.append(time.monotonic())
        await asyncio.sleep(0.005)


def test_loop_side_ops_are_not_done_at_once_under_a_write_lock_and_the_thread_then_does_them(
        path: Path, counted: dict[str, Counter[str]]) -> None:
    # busy_timeout=30: a loop-side call that waited for the lock would take 30 s, not milliseconds
    url = f"sqlite:///{path}?busy_timeout=30"
    q = f"q{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with aio.connect(url) as conn, conn.consumer(q, prefetch=1) as c:
            p = conn.producer()
            warm = await p.send(q, {"i": -1})  # learns the driver's send path (on a thread)
            m0 = await c.receive(timeout=10)
            assert m0 is not None and m0.id == warm
            await m0.ack()
            first = await p.send(q, {"i": 0})
            assert counted["done"]["send"] == 1, "a plain send with the file free runs on the loop"
            m1 = await c.receive(timeout=10)
            assert m1 is not None and m1.id == first
            assert counted["done"]["poll"] >= 1, "a poll with a message in the file runs on the loop"
            second = await p.send(q, {"i": 1})  # waits in the file: prefetch=1 reserved only m1

            lock = sqlite3.connect(str(path), isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
            try:
                t = time.monotonic()
                assert p.blocking.send_nowait(q, {"i": 2}) is None, "a loop-side send under a write lock"
                assert _nowait.poll(c.blocking) is None, "a loop-side reserve under a write lock"
                assert not _nowait.ack(m1.blocking) and not m1.settled, "a loop-side ack under a write lock"
                assert time.monotonic() - t < 5, "a loop-side call waited for the write lock"

                # through the public API: each takes the thread path, which waits for the lock
                # there while the loop keeps running
                ticks: list[float] = []
                stop = asyncio.Event()
                ticker = asyncio.create_task(_ticking(ticks, stop))
                sending = asyncio.create_task(p.send(q, {"i": 2}))
                acking = asyncio.create_task(m1.ack())
                await asyncio.sleep(0.3)
                assert not sending.done() and not acking.done(), "they wait for the lock on a thread"
                assert len(ticks) >= 10, f"the loop ran {len(ticks)} ticks in 0.3 s while they waited"
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            third = await asyncio.wait_for(sending, 10)
            await asyncio.wait_for(acking, 10)
            stop.set()
            await ticker
            assert m1.settled
            assert counted["hops"]["_send_plain"] >= 1 and counted["hops"]["ack"] >= 1
            got = []
            for _ in range(2):
                m = await c.receive(timeout=10)
                assert m is not None
                got.append(m.id)
                await m.ack()
            assert got == [second, third]
            assert await c.receive(timeout=0.3) is None, "a message came twice"
            stats = await conn.stats(q)
            assert (stats.ready, stats.reserved) == (0, 0)
            for mid in (warm, first, second, third):
                assert await conn.status(mid) is mqprimer.Status.DONE

    asyncio.run(main())


def test_a_writer_process_holding_the_lock_loses_and_duplicates_nothing(
        path: Path, counted: dict[str, Counter[str]]) -> None:
    url = f"sqlite:///{path}"
    q = f"q{uuid.uuid4().hex[:8]}"
    n = 400
    with mqprimer.connect(url):
        pass  # creates the file and its schema before the locker opens it
    locker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOCKER), str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "ready"

        async def main() -> tuple[list[str], list[str]]:
            sent: list[str] = []
            got: list[str] = []
            async with aio.connect(url) as conn, conn.consumer(q, prefetch=10) as c:
                p = conn.producer()

                async def consume() -> None:
                    while len(got) < n:
                        m = await c.receive(timeout=20)
                        assert m is not None, f"{n - len(got)} messages never came"
                        got.append(m.id)
                        await m.ack()

                consumer = asyncio.create_task(consume())
                for i in range(n):
                    sent.append(await p.send(q, {"i": i}))
                await asyncio.wait_for(consumer, 30)
                assert await c.receive(timeout=0.3) is None, "a message came twice"
                stats = await conn.stats(q)
                assert (stats.ready, stats.reserved) == (0, 0), f"not every ack was done: {stats}"
            return sent, got

        sent, got = asyncio.run(main())
    finally:
        locker.kill()
        locker.wait()
    assert sorted(got) == sorted(sent) and len(set(got)) == n
    not_done, done = counted["not done"], counted["done"]
    # both paths ran: the lock is held half of the time, so some loop-side calls found it taken
    assert not_done["send"] + not_done["ack"] >= 1, f"never busy? done {done}, not done {not_done}"
    assert done["send"] >= n / 4 and done["ack"] >= n / 4, f"done {done}, not done {not_done}"


def test_the_loop_side_never_checkpoints_and_the_wal_stays_bounded(
        path: Path, counted: dict[str, Counter[str]]) -> None:
    """A WAL checkpoint fsyncs the file: the loop-side connections leave it to the thread side
    (every LOOP_COMMITS commits a call is "not done"), so the WAL does not grow without bound."""
    url = f"sqlite:///{path}"
    q = f"q{uuid.uuid4().hex[:8]}"
    n = 2000
    wal_max = 0

    async def main() -> None:
        nonlocal wal_max
        async with aio.connect(url) as conn, conn.consumer(q, prefetch=50) as c:
            p = conn.producer()
            for i in range(n):
                await p.send(q, {"i": i})
                if i % 100 == 0:
                    wal_max = max(wal_max, os.path.getsize(f"{path}-wal"))
            for i in range(n):
                m = await c.receive(timeout=10)
                assert m is not None
                await m.ack()
                if i % 100 == 0:
                    wal_max = max(wal_max, os.path.getsize(f"{path}-wal"))
            sub = c.blocking._single.sub  # type: ignore[union-attr]
            assert isinstance(sub, SqliteSubscription) and sub.ndb is not None
            assert sub.ndb.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
            assert sub.ndb.execute("PRAGMA busy_timeout").fetchone() == (0,)

    asyncio.run(main())
    # 4000+ commits of ~3 pages each without a checkpoint: ~30 MB; with them ~5 MB
    assert wal_max < 12e6, f"the WAL grew to {wal_max / 1e6:.1f} MB: nothing checkpointed it"
    assert counted["done"]["send"] > n * 0.9 and counted["done"]["ack"] > n * 0.9, counted
    assert counted["not done"]["send"] >= 1 and counted["not done"]["ack"] >= 1, counted


def test_an_empty_queue_does_not_spin_the_loop(path: Path, counted: dict[str, Counter[str]]) -> None:
    """A poll queries the file: while nothing comes, the twin waits on its thread in slices
    and polls once or twice per slice, not in a loop."""

    async def main() -> None:
        async with aio.connect(f"sqlite:///{path}") as conn, conn.consumer("empty") as c:
            assert await c.receive(timeout=1.0) is None

    asyncio.run(main())
    polls = counted["done"]["poll"] + counted["not done"]["poll"]
    assert polls <= 30, f"{polls} polls in a 1 s receive on an empty queue"
    assert counted["hops"]["receive"] >= 5, counted["hops"]


def test_synchronous_full_runs_nothing_on_the_loop(path: Path, counted: dict[str, Counter[str]]) -> None:
    """synchronous=full fsyncs on every commit: not something to run on the event loop."""

    async def main() -> None:
        async with aio.connect(f"sqlite:///{path}?synchronous=full") as conn, conn.consumer("full") as c:
            assert conn.capabilities.nowait == ()
            p = conn.producer()
            for i in range(3):
                await p.send("full", {"i": i})
            for _ in range(3):
                m = await c.receive(timeout=10)
                assert m is not None
                await m.ack()

    asyncio.run(main())
    assert not counted["done"], counted["done"]


def test_a_loop_side_reserve_takes_at_most_its_byte_budget(path: Path, counted: dict[str, Counter[str]]) -> None:
    """Reading a batch of big payloads on the loop would hold it for milliseconds: the loop
    reserves what fits in LOOP_MAX_BATCH bytes, and a message bigger than that on its own is
    reserved by the twin's thread; order and content are kept."""
    q = f"q{uuid.uuid4().hex[:8]}"
    big = "x" * (LOOP_MAX_BATCH + 1000)
    small = "y" * (LOOP_MAX_BATCH // 3)
    url = f"sqlite:///{path}"
    with mqprimer.connect(url) as b:
        ids = b.producer().send_many([(q, small), (q, small), (q, small), (q, big), (q, {"i": 1})])

    async def main() -> list[tuple[str, Any]]:
        out = []
        async with aio.connect(url) as conn, conn.consumer(q, prefetch=50) as c:
            sub = c.blocking._single.sub  # type: ignore[union-attr]
            assert isinstance(sub, SqliteSubscription)
            m = await c.receive(timeout=10)
            assert m is not None
            assert len(sub.buffer) == 1, "the loop reserved more than two thirds of its byte budget"
            out.append((m.id, m.body))
            await m.ack()
            for _ in range(4):
                m = await c.receive(timeout=10)
                assert m is not None
                out.append((m.id, m.body))
                await m.ack()
        return out

    got = asyncio.run(main())
    assert [i for i, _ in got] == ids and [body for _, body in got] == [small, small, small, big, {"i": 1}]
    assert counted["hops"]["receive"] >= 1, "the big message was reserved on a thread"
    # an ack of a payload over LOOP_MAX_PAYLOAD (64 KiB: the four big ones here) frees its
    # overflow pages, reading each: on the thread; the small one's on the loop
    assert (counted["hops"]["ack"], counted["done"]["ack"]) == (4, 1), counted


def test_due_chores_are_left_to_the_thread_which_renews_a_private_subscription(
        path: Path, counted: dict[str, Counter[str]]) -> None:
    """A private topic subscription lives while its consumer renews its lease (and
    housekeeping runs in every process): the loop-side poll never does these writes, it
    reports "not done" when they are due, so that the twin's thread reserves and does them."""
    url = f"sqlite:///{path}"

    async def main() -> None:
        async with aio.connect(url) as conn, conn.consumer(mqprimer.Topic("t.#")) as c:
            sub = c.blocking._single.sub  # type: ignore[union-attr]
            assert isinstance(sub, SqliteSubscription) and sub.private
            p = conn.producer()
            await p.send(mqprimer.Topic("t.a"), {"i": 0})
            m = await c.receive(timeout=10)
            assert m is not None
            await m.ack()
            sub.renew_at = sub.housekeep_at = 0.0  # both due now
            hops = counted["hops"]["receive"]
            await p.send(mqprimer.Topic("t.a"), {"i": 1})
            m = await c.receive(timeout=10)
            assert m is not None and m.body == {"i": 1}
            await m.ack()
            assert counted["hops"]["receive"] > hops, "the reserve with chores due ran on the loop"
            assert sub.renew_at > time.time() and sub.housekeep_at > time.time(), "chores not done"

    asyncio.run(main())
