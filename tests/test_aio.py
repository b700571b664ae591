"""mqprimer.aio: the API's own behaviour (the conformance suite runs through it with --mq-aio),
the asyncio Worker's outcomes, concurrency and exit codes, and `mqprimer worker` with an async handler."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

import mqprimer
import mqprimer.aio as aio
from mqprimer.testing.helpers import wait_until
from mqprimer.worker import EXIT_OK, EXIT_RECYCLE

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://aio-api" if request.param == "memory" else f"sqlite:///{tmp_path}/aio.db"


def q() -> str:
    return f"a{uuid.uuid4().hex[:10]}"


def test_send_receive_outcomes_and_dead_letters_are_awaited(url: str) -> None:
    dest = q()

    async def main() -> None:
        async with aio.connect(url) as conn:
            assert conn.capabilities is conn.blocking.capabilities
            p = conn.producer()
            first = await p.send(dest, {"n": 0}, headers={"h": "v"}, type="t.x")
            rest = await p.send_many([(dest, {"n": i}) for i in range(1, 4)])
            async with conn.consumer(dest, retry=mqprimer.RetryPolicy(max_attempts=2, initial_delay=0,
                                                                      jitter=0)) as c:
                m = await c.receive(timeout=5)
                assert isinstance(m, aio.Message) and (m.id, m.body, m.headers, m.type) == (first, {"n": 0},
                                                                                            {"h": "v"}, "t.x")
                await m.retry()
                again = await c.receive(timeout=5)
                assert again is not None and again.attempt in (1, 2)
                seen = {again.id: again}
                async for got in c:
                    seen[got.id] = got
                    if len(seen) == 4:
                        break
                assert set(seen) == {first, *rest}
                await seen[first].dead_letter("bad")
                for i in rest:
                    await seen[i].ack()
                with pytest.raises(mqprimer.StateError):
                    await seen[first].ack()
                assert await c.receive(timeout=0.3) is None
            dead = conn.dead_letters(dest)
            listed = await dead.list()
            assert [(e.id, e.reason) for e in listed] == [(first, "bad")]
            assert await dead.replay() == 1
            stats = await conn.stats(dest) if conn.capabilities.stats else None
            assert stats is None or stats.ready in (None, 1)
            if conn.capabilities.status:
                assert await conn.status(first) is conn.blocking.status(first)
            else:
                with pytest.raises(mqprimer.UnsupportedError):
                    await conn.status(first)

    asyncio.run(main())


def test_request_reply_with_an_async_worker(url: str) -> None:
    dest = q()

    async def handler(m: aio.Message) -> object:
        await asyncio.sleep(0)
        if m.body == "poison":
            raise mqprimer.DeadLetter("poison pill")
        return {"echo": m.body}

    async def main() -> None:
        worker = aio.Worker(url, dest, handler, retry=mqprimer.RetryPolicy(max_attempts=1), idle_max=0.1,
                            handle_signals=False)
        running = asyncio.create_task(worker.run())
        async with aio.connect(url) as conn:
            reply = await conn.request(dest, "hi", timeout=10)
            assert reply.body == {"echo": "hi"} and reply.settled
            with pytest.raises(mqprimer.StateError):
                await reply.ack()  # a reply is settled when it is read
            with pytest.raises(mqprimer.RemoteError, match="poison pill"):
                await conn.request(dest, "poison", timeout=10)
        worker.stop()
        assert await running == EXIT_OK
        with pytest.raises(mqprimer.StateError):
            await reply.ack()  # after the connection closed too: StateError, as in the blocking API

    asyncio.run(main())


def test_async_worker_runs_handlers_concurrently_as_tasks_with_the_blocking_outcomes() -> None:
    url, dest = "memory://aio-worker", q()
    started = 0
    gate: asyncio.Event
    loop_thread: list[threading.Thread] = []

    async def handler(m: aio.Message) -> None:
        nonlocal started
        loop_thread.append(threading.current_thread())
        started += 1
        if started == 4:
            gate.set()
        await asyncio.wait_for(gate.wait(), 10)  # only if 4 run at once does any finish
        if m.body == "retry":
            raise mqprimer.Retry(delay=0)
        if m.body == "dead":
            raise mqprimer.DeadLetter("no")
        if m.body == "boom":
            raise ValueError("boom")

    async def main() -> None:
        nonlocal gate
        gate = asyncio.Event()
        with mqprimer.connect(url) as conn:
            conn.producer().send_many([(dest, b) for b in ("ok", "retry", "dead", "boom")])
        worker = aio.Worker(url, dest, handler, concurrency=4, max_messages=6, idle_max=0.1, handle_signals=False,
                            retry=mqprimer.RetryPolicy(max_attempts=2, initial_delay=0, jitter=0))
        code = await worker.run()
        assert code == EXIT_RECYCLE
        assert worker.stats == {"ack": 1, "retry": 3, "dead-letter": 2, "lost": 0}, worker.stats
        assert set(loop_thread) == {threading.current_thread()}, "async handlers ran off the loop"

    asyncio.run(main())


def test_plain_handler_runs_on_the_thread_pool() -> None:
    url, dest = "memory://aio-plain", q()
    threads: list[threading.Thread] = []

    def handler(m: mqprimer.Message) -> None:
        assert isinstance(m, mqprimer.Message)
        threads.append(threading.current_thread())

    async def main() -> None:
        with mqprimer.connect(url) as conn:
            conn.producer().send(dest, "x")
        worker = aio.Worker(url, dest, handler, max_messages=1, idle_max=0.1, handle_signals=False)
        assert await worker.run() == EXIT_RECYCLE
        assert threads and threads[0] is not threading.current_thread()

    asyncio.run(main())


HANDLER = '''
import asyncio, os
from pathlib import Path
OUT = Path(os.environ["OUT"])

async def handle(message):
    (OUT / (str(message.body) + ".started")).touch()
    await asyncio.sleep(1.0 if str(message.body).startswith("slow") else 0)
    (OUT / (str(message.body) + ".done")).touch()
'''


def test_cli_worker_runs_an_async_handler_recycles_and_drains_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "aio_handler.py").write_text(HANDLER)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), PYTHONUNBUFFERED="1")
    url = f"sqlite:///{tmp_path}/cli.db"
    with mqprimer.connect(url) as conn:
        conn.producer().send_many([("jobs", f"m{i}") for i in range(3)])
    cmd = [sys.executable, "-m", "mqprimer.cli", "worker", url, "jobs", "aio_handler:handle", "--idle-max", "0.1"]
    done = subprocess.run([*cmd, "--max-messages", "3"], cwd=tmp_path, env=env, capture_output=True, timeout=30)
    assert done.returncode == EXIT_RECYCLE, done.stderr.decode()[-2000:]
    assert sorted(p.name for p in out.glob("*.done")) == ["m0.done", "m1.done", "m2.done"]
    with mqprimer.connect(url) as conn:
        conn.producer().send(url and "jobs", "slow")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (out / "slow.started").exists(), timeout=20, what="the slow handler to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == EXIT_OK, (proc.stdout.read() if proc.stdout else b"").decode()[-2000:]
        assert (out / "slow.done").exists(), "SIGTERM did not let the in-flight handler finish"
    finally:
        proc.kill()
    with mqprimer.connect(url) as conn, conn.consumer("jobs") as c:
        assert c.receive(timeout=0.3) is None, "the drained message was not acked"
        conn.producer().send("jobs", "slow2")
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:  # a second signal aborts: 128 + SIGTERM, the message in flight goes back to the broker
        wait_until(lambda: (out / "slow2.started").exists(), timeout=20, what="the second slow handler to start")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: b"SIGTERM received" in log.read_bytes(), what="the first SIGTERM to be taken")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    with mqprimer.connect(url) as conn, conn.consumer("jobs") as c:
        back = c.receive(timeout=5)
        assert back is not None and back.body == "slow2", "the aborted message did not go back to the broker"
        back.ack()


def test_send_options_are_keyword_only_as_in_the_blocking_api() -> None:
    """aio Producer.send takes its options by keyword only (positional ones raise TypeError,
    not land in ``headers``), and its signature says so."""
    import inspect

    from mqprimer.aio._conn import Producer

    params = inspect.signature(Producer.send).parameters
    assert [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY] == [
        "headers", "type", "priority", "delay", "ttl", "id"]

    async def main() -> None:
        async with aio.connect(f"memory://kw{uuid.uuid4().hex[:6]}") as conn:
            p = conn.producer()
            with pytest.raises(TypeError, match="keyword-only"):
                await p.send("q", {"a": 1}, {"h": "1"})  # type: ignore[arg-type]
            assert await p.send("q", {"a": 1}, headers={"h": "1"}, type="t.x")

    asyncio.run(main())
