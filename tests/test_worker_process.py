"""`mqprimer worker` as a real process on sqlite: signals, recycling, a broker that is down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mqprimer
from mqprimer.testing.helpers import wait_until

HANDLER = '''
import os, time
from pathlib import Path

OUT = Path(os.environ["OUT"])

def handle(message):
    name = str(message.body)
    (OUT / (name + ".started")).touch()
    if name.startswith("slow"):
        time.sleep(float(os.environ.get("SLOW", "1.5")))
    (OUT / (name + ".done")).touch()
'''


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "wk_handler.py").write_text(HANDLER)
    out = tmp_path / "out"
    out.mkdir()
    e = dict(os.environ)
    e.update(OUT=str(out), PYTHONUNBUFFERED="1")
    e.pop("MQPRIMER_URL", None)
    return e


def worker(tmp_path: Path, env: dict[str, str], url: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mqprimer.cli", "worker", url, "jobs", "wk_handler:handle", *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def done(tmp_path: Path, name: str, what: str = "done") -> bool:
    return (tmp_path / "out" / f"{name}.{what}").exists()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_drains_in_flight_and_exits_0(tmp_path: Path, env: dict[str, str], signum: int) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    with mqprimer.connect(url) as conn:
        mid = conn.producer().send("jobs", "slow1")
        proc = worker(tmp_path, env, url)
        try:
            wait_until(lambda: done(tmp_path, "slow1", "started"), timeout=20, what="handler started")
            proc.send_signal(signum)
            out, _ = proc.communicate(timeout=20)
        finally:
            proc.kill()
        assert proc.returncode == 0, out.decode()
        assert done(tmp_path, "slow1")
        assert conn.status(mid) is mqprimer.Status.DONE
        assert b"finishing 1 in-flight message(s)" in out


def test_second_signal_aborts_and_the_message_goes_back(tmp_path: Path, env: dict[str, str]) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    env["SLOW"] = "60"
    with mqprimer.connect(url) as conn:
        mid = conn.producer().send("jobs", "slow2")
        proc = worker(tmp_path, env, url)
        try:
            wait_until(lambda: done(tmp_path, "slow2", "started"), timeout=20, what="handler started")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert proc.poll() is None  # still draining: the handler runs for a minute
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=10)
        finally:
            proc.kill()
        assert proc.returncode == 128 + signal.SIGTERM, out.decode()
        assert time.monotonic() - t0 < 5
        assert not done(tmp_path, "slow2")
        assert conn.status(mid) is mqprimer.Status.READY
        with conn.consumer("jobs") as c:
            m = c.receive(timeout=5)
            assert m is not None and m.id == mid
            m.ack()


def test_recycle_by_max_messages_exits_75(tmp_path: Path, env: dict[str, str]) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        for i in range(5):
            p.send("jobs", f"m{i}")
        proc = worker(tmp_path, env, url, "--max-messages", "3", "--prefetch", "10")
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 75, out.decode()
        assert [done(tmp_path, f"m{i}") for i in range(5)] == [True, True, True, False, False]
        assert b"recycling: max_messages=3 reached" in out


def test_recycle_by_max_time_exits_75_and_json_logs(tmp_path: Path, env: dict[str, str]) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    with mqprimer.connect(url) as conn:
        mid = conn.producer().send("jobs", "j1")
    proc = worker(tmp_path, env, url, "--max-time", "1.5s", "--json")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out.decode()
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    [ack] = [r for r in lines if r.get("outcome") == "ack"]
    assert ack["id"] == mid and ack["destination"] == "jobs" and ack["attempt"] == 1 and ack["duration_ms"] >= 0
    assert any("max_time=1.5s reached" in r["message"] for r in lines)


def test_broker_down_at_start_worker_waits_without_spinning_then_works(tmp_path: Path, env: dict[str, str]) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the database directory should be")
    url = f"sqlite:///{blocker}/q.db"
    proc = worker(tmp_path, env, url, "--reconnect-max", "1s")
    try:
        time.sleep(3)
        assert proc.poll() is None, "the worker exited instead of waiting for the broker"
        assert cpu_seconds(proc.pid) < 2.0  # includes interpreter start-up; a spinning loop burns ~3 s
        blocker.unlink()
        blocker.mkdir()
        with mqprimer.connect(url) as conn:
            conn.producer().send("jobs", "late")
        wait_until(lambda: done(tmp_path, "late"), timeout=40, what="message handled after the broker came up")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert b"connect failed" in out and b"retrying in" in out


def test_recycle_by_max_memory_exits_75(tmp_path: Path, env: dict[str, str]) -> None:
    proc = worker(tmp_path, env, f"sqlite:///{tmp_path}/q.db", "--max-memory", "1MiB")  # any Python is bigger
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out.decode()
    assert b"recycling: max_memory=1MiB reached (RSS " in out


def test_idle_worker_sleeps_and_stops_promptly(tmp_path: Path, env: dict[str, str]) -> None:
    proc = worker(tmp_path, env, f"sqlite:///{tmp_path}/q.db")
    try:
        assert proc.stdout is not None
        assert b"worker started" in proc.stdout.readline()
        time.sleep(0.5)
        cpu0 = cpu_seconds(proc.pid)
        time.sleep(2.0)
        assert cpu_seconds(proc.pid) - cpu0 < 0.4  # polling an empty queue, not spinning
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        assert time.monotonic() - t0 < 3.0
    finally:
        proc.kill()
    assert proc.returncode == 0
