"""The `mqprimer` command line, run as a real process against sqlite files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mqprimer
from mqprimer.testing.helpers import wait_until


def run(args: list[str], env: dict[str, str], stdin: str | None = None, cwd: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mqprimer.cli", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/cli.db"


@pytest.fixture
def env(url: str) -> dict[str, str]:
    e = dict(os.environ)
    e["MQPRIMER_URL"] = url
    e.pop("MQPRIMER_DEBUG", None)
    return e


def test_send_and_consume_with_the_default_url(env: dict[str, str], tmp_path: Path) -> None:
    r = run(["send", "jobs", '{"n": 1}', "-H", "tenant=acme", "--type", "job.created", "--priority", "5"], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sent ")
    (tmp_path / "body.txt").write_text("plain text")
    assert run(["send", "jobs", "--file", str(tmp_path / "body.txt")], env).returncode == 0
    r = run(["send", "jobs", "--json"], env, stdin='{"i": 1}\n\n{"i": 2}\n"three"\n')
    assert r.returncode == 0, r.stderr
    sent = json.loads(r.stdout)
    assert sent["sent"] == 3 and len(sent["ids"]) == 3
    r = run(["consume", "jobs", "--json", "-n", "5", "-t", "5"], env)
    assert r.returncode == 0, r.stderr
    msgs = [json.loads(line) for line in r.stdout.splitlines()]
    assert msgs[0]["body"] == {"n": 1} and msgs[0]["headers"] == {"tenant": "acme"} and msgs[0]["type"] == "job.created"
    assert [m["body"] for m in msgs[1:]] == ["plain text", {"i": 1}, {"i": 2}, "three"]
    assert [m["id"] for m in msgs[2:]] == sent["ids"]
    r = run(["consume", "jobs", "-n", "1", "-t", "0.5"], env)  # all were acked: nothing left
    assert r.returncode == 1 and "received 0 of 1" in r.stderr


def test_consume_leave_puts_messages_back_and_status_follows(env: dict[str, str], url: str) -> None:
    mid = run(["send", url, "jobs", "1", "--json"], env).stdout
    mid = json.loads(mid)["ids"][0]
    assert run(["status", mid], env).stdout.strip() == "ready"
    r = run(["consume", url, "jobs", "-n", "1", "-t", "5", "--leave"], env)
    assert r.returncode == 0 and r.stdout.startswith(mid)
    assert json.loads(run(["status", mid, "--json"], env).stdout) == {"id": mid, "status": "ready"}
    run(["consume", "jobs", "-n", "1", "-t", "5"], env)
    assert run(["status", mid], env).stdout.strip() == "done"


def test_stdin_line_that_is_not_json_is_a_usage_error(env: dict[str, str]) -> None:
    r = run(["send", "jobs"], env, stdin='{"ok": 1}\nnot json\n')
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "mqprimer send: error: stdin line 2 is not JSON (Expecting value); use --text for text"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker", "jobs", "no_such_module:handle"], "cannot import handler module 'no_such_module'"),
        (["worker", "jobs", "os.path:no_such_function"], "has no attribute 'no_such_function'"),
        (["worker", "jobs", "os:sep"], "is not callable"),
        (["worker", "jobs", "broken_mod:f"], "cannot import handler module 'broken_mod': ZeroDivisionError"),
        (["worker", "jobs", "nocolon"], "must be MODULE:FUNCTION"),
        (["worker", "jobs", "os:getcwd", "--concurrency", "-2"], "argument -c/--concurrency: must be at least 1"),
        (["worker", "jobs", "os:getcwd", "--max-memory", "200XB"], "invalid memory size '200XB'"),
        (["worker", "jobs", "os:getcwd", "--max-time", "5 fortnights"], "invalid duration"),
        (["send", "nosuch://x", "jobs", "1"], "no mqprimer backend for URL scheme 'nosuch'"),
        (["send", "jobs", "1", "--priority", "12"], "priority must be an int from 0"),
        (["dead-letters", "jobs", "purge"], "add --yes"),
        (["dead-letters", "jobs"], "missing ACTION"),
        (["consume"], "expected [URL] DEST"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(env: dict[str, str], tmp_path: Path, args: list[str],
                                               message: str) -> None:
    (tmp_path / "broken_mod.py").write_text("x = 1 / 0\n")
    r = run(args, env, cwd=tmp_path)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_broker_exits_69_with_one_line(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "f").write_text("not a directory")
    r = run(["send", f"sqlite:///{tmp_path}/f/q.db", "jobs", "1"], env, timeout=120)
    assert r.returncode == 69, r
    assert len(r.stderr.strip().splitlines()) == 1 and "unreachable" in r.stderr


def test_dead_letters_list_show_replay_purge(env: dict[str, str], url: str) -> None:
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        ids = [p.send("jobs", {"n": i}) for i in range(3)]
        with conn.consumer("jobs") as c:
            for _ in range(3):
                m = c.receive(timeout=5)
                assert m is not None
                m.dead_letter(f"reason {m.body['n']}")
    r = run(["dead-letters", "jobs", "list"], env)
    assert r.returncode == 0 and "3 dead letter(s) in jobs" in r.stdout and "reason 1" in r.stdout
    listed = json.loads(run(["dead-letters", "jobs", "list", "--json"], env).stdout)
    assert [d["id"] for d in listed] == ids and listed[2]["reason"] == "reason 2" and listed[2]["origin"] == "jobs"
    shown = json.loads(run(["dead-letters", "jobs", "show", ids[1], "--json"], env).stdout)
    assert shown["body"] == {"n": 1} and shown["reason"] == "reason 1"
    assert run(["dead-letters", "jobs", "show", "no-such-id"], env).returncode == 1
    r = run(["dead-letters", url, "jobs", "replay", ids[0], "--json"], env)
    assert json.loads(r.stdout)["replayed"] == 1, r.stderr
    r = run(["dead-letters", "jobs", "replay", "--limit", "1", "--progress"], env)
    assert "replayed 1 dead letter(s)" in r.stdout and "replaying: 1/1" in r.stderr
    with mqprimer.connect(url) as conn:
        assert [conn.status(i) for i in ids] == [mqprimer.Status.READY] * 2 + [mqprimer.Status.DEAD]
    assert "purged 1 dead letter(s)" in run(["dead-letters", "jobs", "purge", "--yes"], env).stdout
    assert "0 dead letter(s)" in run(["dead-letters", "jobs", "list"], env).stdout


def test_bulk_send_shows_progress_only_when_asked(env: dict[str, str]) -> None:
    lines = "".join(f'{{"i": {i}}}\n' for i in range(250))
    r = run(["send", "bulk"], env, stdin=lines)
    assert r.stdout.strip() == "sent 250 messages to bulk" and r.stderr == ""  # stderr is no terminal here
    r = run(["send", "bulk", "--progress"], env, stdin=lines)
    assert "sending: 250" in r.stderr and "msg/s" in r.stderr


def test_doctor_reports_checks_and_capabilities(env: dict[str, str], tmp_path: Path) -> None:
    r = run(["doctor", "--json"], env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["ok"] and [c["check"] for c in d["checks"]] == ["connect", "round trip"]
    assert d["capabilities"]["name"] == "sqlite"
    (tmp_path / "f").write_text("")
    r = run(["doctor", f"sqlite:///{tmp_path}/f/x.db"], env)
    assert r.returncode == 1 and "FAIL connect" in r.stdout


def test_backends_prints_the_generated_matrix(env: dict[str, str]) -> None:
    r = run(["backends"], env)
    assert r.returncode == 0 and "sqlite://" in r.stdout and "memory://" in r.stdout
    assert "| backend |" in run(["backends", "--markdown"], env).stdout.replace("  ", " ")
    rows = json.loads(run(["backends", "--json"], env).stdout)
    assert any(r.get("name") == "sqlite" and "sqlite://" in r["schemes"] for r in rows)


def test_bridge_forwards_and_acks_at_the_source(env: dict[str, str], url: str, tmp_path: Path) -> None:
    sink = f"sqlite:///{tmp_path}/sink.db"
    with mqprimer.connect(url) as src:
        ids = [src.producer().send("outbox", {"order": i}, headers={"k": "v"}) for i in range(5)]
    r = run(["bridge", url, "outbox", sink, "orders", "--timeout", "1", "--json"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["forwarded"] == 5
    with mqprimer.connect(sink) as dst, mqprimer.connect(url) as src:
        with dst.consumer("orders") as c:
            got = [c.receive(timeout=5) for _ in range(5)]
        want = [(i, {"order": n}, {"k": "v"}) for n, i in enumerate(ids)]
        assert [(m.id, m.body, m.headers) for m in got if m] == want
        assert all(src.status(i) is mqprimer.Status.DONE for i in ids)


def test_bridge_holds_messages_while_the_sink_is_down(env: dict[str, str], url: str, tmp_path: Path) -> None:
    sink_path = tmp_path / "sink.db"
    sink = f"sqlite:///{sink_path}?busy_timeout=0.1"
    with mqprimer.connect(sink):
        pass  # create the file, then make it unwritable by holding its write lock
    with mqprimer.connect(url) as src:
        ids = [src.producer().send("outbox", i) for i in range(3)]
        lock = sqlite3.connect(sink_path, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        proc = subprocess.Popen([sys.executable, "-m", "mqprimer.cli", "bridge", url, "outbox", sink, "orders",
                                 "--count", "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: src.status(ids[0]) is mqprimer.Status.RESERVED, timeout=20, what="bridge took them")
            time.sleep(1.0)
            assert proc.poll() is None
            assert [src.status(i) for i in ids] == [mqprimer.Status.RESERVED] * 3  # not acked: the sink has nothing
            lock.execute("COMMIT")
            lock.close()
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert "forwarded 3 message(s)" in out
        assert all(src.status(i) is mqprimer.Status.DONE for i in ids)
    with mqprimer.connect(sink) as dst:
        assert all(dst.status(i) is mqprimer.Status.READY for i in ids)


@pytest.mark.parametrize("broker", ["amqp", "stomp-rabbitmq"])
def test_wrong_credentials_exit_77_in_one_line_without_the_password(env: dict[str, str], broker: str) -> None:
    from conftest import need_broker

    good = mqprimer.URL.parse(need_broker(broker))
    bad = mqprimer.URL(good.scheme, good.username, "not-the-password-x9", good.hosts, good.path, good.query)
    r = run(["send", bad.render(hide_password=False), "jobs", "1"], env, timeout=120)
    assert r.returncode == 77, r
    assert len(r.stderr.strip().splitlines()) == 1 and "refused" in r.stderr
    assert "not-the-password-x9" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("broker", ["amqp", "beanstalk"])
def test_send_consume_doctor_on_a_real_broker(env: dict[str, str], broker: str) -> None:
    from conftest import need_broker

    url = need_broker(broker)
    queue = f"cli{os.getpid()}{broker.replace('-', '')}"
    assert run(["send", url, queue, '{"x": 1}'], env).returncode == 0
    r = run(["consume", url, queue, "-n", "1", "-t", "10", "--json"], env)
    assert r.returncode == 0 and json.loads(r.stdout)["body"] == {"x": 1}
    d = json.loads(run(["doctor", url, "--json"], env).stdout)
    assert d["ok"], d
