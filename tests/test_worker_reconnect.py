"""`mqprimer worker` processes through real broker outages: they wait, never spin, and resume.

- a private beanstalkd (binlog on) SIGKILLed mid-stream and restarted on the same port;
- a sqlite file made unwritable mid-stream by another process's exclusive lock.
Messages may be handled twice (at-least-once); none may be lost.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import mqprimer
from mqprimer.testing.helpers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

HANDLER = '''
import os, time
from pathlib import Path

def handle(message):
    time.sleep(0.05)
    (Path(os.environ["OUT"]) / message.id).touch()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "rc_handler.py").write_text(HANDLER)
    d = tmp_path / "out"
    d.mkdir()
    return d


def start_worker(tmp_path: Path, out: Path, url: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OUT=str(out), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mqprimer.cli", "worker", url, "jobs", "rc_handler:handle", "--prefetch", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


class Beanstalkd:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.binlog = tmp_path / "binlog"
        self.binlog.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["beanstalkd", "-l", "127.0.0.1", "-p", str(self.port), "-b", str(self.binlog)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port), timeout=15, what="beanstalkd listening")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def beanstalkd(tmp_path: Path) -> Iterator[Beanstalkd]:
    if shutil.which("beanstalkd") is None:
        msg = "beanstalkd is not installed (apt-get install beanstalkd)"
        pytest.fail(msg) if CI else pytest.skip(msg)
    b = Beanstalkd(tmp_path)
    b.start()
    yield b
    b.kill()


def test_worker_survives_a_sigkilled_beanstalkd(tmp_path: Path, out: Path, beanstalkd: Beanstalkd) -> None:
    url = f"beanstalk://127.0.0.1:{beanstalkd.port}"
    with mqprimer.connect(url) as conn:
        ids = [conn.producer().send("jobs", i) for i in range(40)]
    proc = start_worker(tmp_path, out, url)
    try:
        wait_until(lambda: len(list(out.iterdir())) >= 8, timeout=30, what="work under way")
        beanstalkd.kill()
        cpu0 = cpu_seconds(proc.pid)
        time.sleep(2.0)
        assert proc.poll() is None, "the worker exited while the broker was down"
        assert cpu_seconds(proc.pid) - cpu0 < 0.5, "the worker spun while the broker was down"
        beanstalkd.start()  # same port, same binlog: the jobs are still there
        wait_until(lambda: {p.name for p in out.iterdir()} >= set(ids), timeout=90, interval=0.2,
                   what="every job handled after the restart")
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.decode()[-3000:]
    assert b"reconnect" in log or b"retrying in" in log


def test_worker_survives_a_locked_sqlite_file(tmp_path: Path, out: Path) -> None:
    path = tmp_path / "q.db"
    url = f"sqlite:///{path}?busy_timeout=0.1&visibility_timeout=1"
    with mqprimer.connect(url) as conn:
        ids = [conn.producer().send("jobs", i) for i in range(40)]
    proc = start_worker(tmp_path, out, url)
    try:
        wait_until(lambda: len(list(out.iterdir())) >= 8, timeout=30, what="work under way")
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        cpu0 = cpu_seconds(proc.pid)
        time.sleep(2.5)
        during = cpu_seconds(proc.pid) - cpu0
        lock.execute("COMMIT")
        lock.close()
        assert proc.poll() is None
        assert during < 0.8, f"the worker burned {during:.2f}s CPU in a 2.5s outage"
        wait_until(lambda: {p.name for p in out.iterdir()} >= set(ids), timeout=60, interval=0.2,
                   what="every message handled after the outage")
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.decode()[-3000:]
    assert b"database is locked" in log
