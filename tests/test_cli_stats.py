"""``mqprimer stats``: the table, --json, and --watch (redrawn in place on a terminal, rates)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mqprimer
from conftest import need_broker
from mqprimer import QueueStats
from mqprimer._cli_stats import rates
from mqprimer.testing.helpers import wait_until


def _env(url: str) -> dict[str, str]:
    e = dict(os.environ)
    e["MQPRIMER_URL"] = url
    e.pop("MQPRIMER_DEBUG", None)
    return e


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mqprimer", *args], capture_output=True, text=True, env=env,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_rates_from_running_totals_or_derived_from_the_net_change() -> None:
    a = QueueStats("q", ready=10, delayed=0, reserved=0, enqueued=100, dequeued=90)
    b = QueueStats("q", ready=14, delayed=0, reserved=2, enqueued=120, dequeued=104)
    assert rates(a, b, 2.0) == {"in_per_s": 10.0, "out_per_s": 7.0, "net_per_s": 3.0}
    # only the in total known (out derived), then neither (only the net change)
    one = rates(QueueStats("q", ready=10, enqueued=5), QueueStats("q", ready=4, enqueued=9), 1.0)
    assert one == {"in_per_s": 4.0, "out_per_s": 10.0, "net_per_s": -6.0}
    assert rates(QueueStats("q", ready=3), QueueStats("q", ready=5), 0.5) == {
        "in_per_s": None, "out_per_s": None, "net_per_s": 4.0}
    # a total that went down (broker restarted): no rate rather than a negative one
    assert rates(QueueStats("q", ready=1, enqueued=50), QueueStats("q", ready=1, enqueued=3), 1.0)["in_per_s"] is None
    assert rates(QueueStats("q"), QueueStats("q"), 1.0) == dict.fromkeys(("in_per_s", "out_per_s", "net_per_s"))


def test_table_and_json_match_conn_stats(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        for i in range(3):
            p.send("jobs", i)
        p.send("jobs", "later", delay=60)
        expected = conn.stats("jobs")
    r = _cli("stats", "jobs", "empty", "--json", env=_env(url))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got[0] == expected.as_dict() and got[0]["ready"] == 3 and got[0]["delayed"] == 1
    assert got[1]["destination"] == "empty" and got[1]["ready"] == 0
    r = _cli("stats", url, "jobs", env=_env("memory://elsewhere"))
    assert r.returncode == 0, r.stderr
    head, row, note = r.stdout.splitlines()
    assert head.split() == ["queue", "ready", "delayed", "reserved", "dead", "consumers"]
    assert row.split() == ["jobs", "3", "1", "0", "0", "-"] and note.startswith("-:")


def test_watch_redraws_in_place_on_a_terminal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/w.db"
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mqprimer", "stats", "jobs", "--watch", "0.2", "-n", "3"],
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE, env=_env(url))
    os.close(follower)
    screen = b""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the process closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    text = screen.decode()
    assert text.count("\x1b[2J") == 1, "the screen is cleared once, then redrawn from the top"
    assert text.count("\x1b[H") == 3 and text.count("mqprimer stats") == 3, text
    assert "in/s" in text and "net/s" in text


@pytest.mark.timeout(60)
def test_watch_json_shows_messages_coming_in_and_going_out_on_beanstalk() -> None:
    url = need_broker("beanstalk")
    queue = f"stats.{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-m", "mqprimer", "stats", url, queue, "--watch", "0.3", "--json"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env("memory://unused"))
    assert proc.stdout is not None
    out = proc.stdout

    def read_until(what: str, cond: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        def step() -> dict[str, Any]:
            line = out.readline()
            assert line, f"the watch ended: {proc.stderr.read() if proc.stderr else ''}"
            row: dict[str, Any] = json.loads(line)["queues"][0]
            return row if cond(row) else {}

        return wait_until(step, timeout=20, interval=0, what=what)

    try:
        read_until("an empty queue", lambda r: r["ready"] == 0)
        with mqprimer.connect(url) as conn:
            p = conn.producer()
            for i in range(20):
                p.send(queue, i)
            row = read_until("20 in", lambda r: r["ready"] == 20 and (r["in_per_s"] or 0) > 0)
            assert row["out_per_s"] in (0, 0.0) or row["out_per_s"] is None
            with conn.consumer(queue, prefetch=20) as c:
                for _ in range(20):
                    m = c.receive(timeout=5)
                    assert m is not None
                    m.ack()
            row = read_until("20 out", lambda r: r["ready"] == 0 and (r["out_per_s"] or 0) > 0)
            assert row["dequeued"] == 20 and row["enqueued"] == 20
    finally:
        proc.terminate()
        proc.wait(timeout=10)
