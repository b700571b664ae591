"""examples/supervisord/supervisord.conf under a real supervisord, two workers on sqlite.

One supervisord for the whole module (starting one costs seconds): SIGKILL a worker (it is
restarted, nothing is lost), recycle by --max-messages (exit 75, restarted), and
`supervisorctl stop` (in-flight messages finish, exit 0).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import mqprimer
from mqprimer.testing.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "examples" / "supervisord" / "supervisord.conf"
BIN = Path(sys.executable).parent
NAMES = ["mqprimer-worker:mqprimer-worker_00", "mqprimer-worker:mqprimer-worker_01"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@dataclass
class Supervisor:
    run: Path
    handled: Path
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]

    def ctl(self, *args: str, timeout: float = 90) -> str:
        r = subprocess.run([str(BIN / "supervisorctl"), "-c", str(CONF), *args], env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        return r.stdout + r.stderr

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.ctl("status").splitlines():
            m = re.match(r"(\S+)\s+RUNNING\s+pid (\d+)", line)
            if m:
                out[m.group(1)] = int(m.group(2))
        return out

    def log(self) -> str:
        return (self.run / "supervisord.log").read_text()

    def done(self) -> set[str]:
        return {p.name for p in self.handled.iterdir() if "." not in p.name}


@pytest.fixture(scope="module")
def sv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    run = tmp_path_factory.mktemp("sv")
    handled = run / "handled"
    handled.mkdir()
    url = f"sqlite:///{run}/jobs.db?visibility_timeout=2"
    with mqprimer.connect(url):
        pass  # create the database before two workers race to
    env = dict(os.environ)
    env.update(MQPRIMER_URL=url, MQPRIMER_RUN=str(run), MQPRIMER_MAX_MESSAGES="15", HANDLED_DIR=str(handled),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    proc = subprocess.Popen([str(BIN / "supervisord"), "-n", "-c", str(CONF)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = Supervisor(run, handled, url, env, proc)
    try:
        wait_until(lambda: proc.poll() is None and len(s.pids()) == 2, timeout=60, interval=0.3,
                   what="two RUNNING workers")
        yield s
    finally:
        try:
            s.ctl("shutdown", timeout=60)
            proc.wait(60)
        except Exception:
            pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        for line in s.ctl("status").splitlines() if proc.poll() is None else []:
            print(line)


def send(url: str, bodies: list[dict[str, float]]) -> list[str]:
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        return [p.send("jobs", b) for b in bodies]


def test_sigkilled_worker_is_restarted_and_no_message_is_lost(sv: Supervisor) -> None:
    ids = send(sv.url, [{"sleep": 0.15}] * 40)
    wait_until(lambda: len(sv.done() & set(ids)) >= 5, timeout=60, what="work under way")
    victim = NAMES[0]

    def kill_victim() -> int | None:
        pid = sv.pids().get(victim)  # not RUNNING just now (recycling between lives): try again
        if pid is None:
            return None
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        return pid

    killed = wait_until(kill_victim, timeout=60, interval=0.1, what="a running worker to kill")
    wait_until(lambda: sv.pids().get(victim, killed) != killed, timeout=60, interval=0.3,
               what="the killed worker restarted")
    wait_until(lambda: set(ids) <= sv.done(), timeout=90, interval=0.2, what="every message handled")
    assert re.search(r"exited: mqprimer-worker_00 \(terminated by SIGKILL", sv.log())


def test_recycle_by_max_messages_exits_75_and_is_restarted(sv: Supervisor) -> None:
    # 15 messages per life, 0.15 s each, 2 at a time: a life lasts > startsecs=1, so a recycle is
    # a normal exit for supervisord, not a failed start
    ids = send(sv.url, [{"sleep": 0.15}] * 60)
    wait_until(lambda: set(ids) <= sv.done(), timeout=120, interval=0.2, what="every message handled")
    log = sv.log()
    assert re.search(r"exited: mqprimer-worker_0[01] \(exit status 75; not expected\)", log), log[-2000:]
    wait_until(lambda: len(sv.pids()) == 2, timeout=60, interval=0.3, what="both workers running again")
    assert "gave up" not in log and "FATAL" not in log and "exited too quickly" not in log


def test_supervisorctl_stop_drains_in_flight_messages(sv: Supervisor) -> None:
    wait_until(lambda: len(sv.pids()) == 2, timeout=60, interval=0.3, what="both workers running")
    # 5 s: a loaded machine took over 2 s to run supervisorctl, the handlers were done by then and
    # a worker at its --max-messages had already exited 75 (recycled) instead of being stopped
    ids = send(sv.url, [{"sleep": 5.0}, {"sleep": 5.0}])
    wait_until(lambda: all((sv.handled / f"{i}.started").exists() for i in ids), timeout=60,
               what="both slow messages started")
    t0 = time.monotonic()
    out = sv.ctl("stop", "mqprimer-worker:*")
    assert time.monotonic() - t0 >= 1.0  # waited for the handlers instead of killing them
    assert out.count("stopped") == 2, out
    assert set(ids) <= sv.done()
    log = sv.log()
    assert len(re.findall(r"stopped: mqprimer-worker_0[01] \(exit status 0\)", log)) == 2, log[-2000:]
    with mqprimer.connect(sv.url) as conn:
        assert all(conn.status(i) is mqprimer.Status.DONE for i in ids)
