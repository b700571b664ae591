"""Request/reply beyond the conformance suite: a worker SIGKILLed mid-request, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import mqprimer
from conftest import need_broker
from mqprimer.backend import NATIVE
from mqprimer.cli import main
from mqprimer.envelope import decode, encode, make
from mqprimer.testing.helpers import wait_until

WORKER = '''
import os, sys, time
from pathlib import Path
import mqprimer

MARK = Path(os.environ["MARK"])

def handle(message):
    if os.environ.get("HANG"):
        MARK.write_text(str(message.attempt))
        time.sleep(600)  # killed here, the request unsettled
    return {"served_by": os.getpid(), "attempt": message.attempt, "echo": message.body}

mqprimer.Worker(sys.argv[1], sys.argv[2], handle, idle_max=0.1).run()
'''


def _url(name: str, tmp_path: Path) -> str:
    if name == "sqlite":
        # a reserved request whose worker died comes back after the visibility timeout
        return f"sqlite:///{tmp_path}/rpc.db?visibility_timeout=1"
    return need_broker(name)


def _worker(url: str, dest: str, tmp_path: Path, hang: bool) -> subprocess.Popen[bytes]:
    script = tmp_path / "rpc_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MARK=str(tmp_path / "mark"), PYTHONUNBUFFERED="1")
    env.pop("HANG", None)
    if hang:
        env["HANG"] = "1"
    return subprocess.Popen([sys.executable, str(script), url, dest], env=env)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["sqlite", "beanstalk", "amqp", "stomp-rabbitmq", "stomp-activemq", "gearman"])
def test_worker_killed_mid_request_the_caller_still_gets_exactly_one_reply(backend: str, tmp_path: Path) -> None:
    url = _url(backend, tmp_path)
    dest = f"rpc-kill-{uuid.uuid4().hex[:8]}"
    conn = mqprimer.connect(url)
    replies: list[Any] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            replies.append(conn.request(dest, "job", timeout=30).body)
        except BaseException as exc:
            errors.append(exc)

    first = _worker(url, dest, tmp_path, hang=True)
    second: subprocess.Popen[bytes] | None = None
    caller = threading.Thread(target=call)
    caller.start()
    try:
        mark = tmp_path / "mark"
        wait_until(mark.exists, timeout=20, what="the first worker to start on the request")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _worker(url, dest, tmp_path, hang=False)
        caller.join(40)
        assert not errors, repr(errors)
        assert len(replies) == 1
        assert replies[0]["echo"] == "job" and replies[0]["served_by"] == second.pid
        # a later request reads the reply path again: no second reply to the first request came
        assert conn.request(dest, "after", timeout=15).body["echo"] == "after"
        assert conn.dropped_replies == {"duplicate": 0, "late": 0, "invalid": 0}
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
        conn.close()


def test_cli_request_prints_the_reply_and_fails_clearly_on_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    dest = "resize"

    def handler(m: mqprimer.Message) -> Any:
        return {"width": m.body["w"] // 2}

    worker = mqprimer.Worker(url, dest, handler, idle_max=0.05, handle_signals=False)
    th = threading.Thread(target=worker.run, daemon=True)
    th.start()
    try:
        assert main(["request", url, dest, '{"w": 1280}', "--timeout", "10"]) == 0
        assert capsys.readouterr().out.strip() == '{"width": 640}'
        assert main(["request", url, dest, '{"w": 64}', "--timeout", "10", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["body"] == {"width": 32} and out["type"] == "mqprimer.reply" and out["correlation_id"]
    finally:
        worker.stop()
        th.join(20)
    assert main(["request", url, "nobody-serves-this", "1", "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err
    assert "no reply from nobody-serves-this within 0.3s" in err
    with pytest.raises(SystemExit) as info:
        main(["request", url, dest, "1", "--timeout", "0"])
    assert info.value.code == 2 and "--timeout: must be > 0 seconds" in capsys.readouterr().err


def _serve_in_thread(url: str, dest: str) -> tuple[mqprimer.Worker, threading.Thread]:
    worker = mqprimer.Worker(url, dest, lambda m: {"echo": m.body}, idle_max=0.05, handle_signals=False)
    th = threading.Thread(target=worker.run, daemon=True)
    th.start()
    return worker, th


def _cloudevent(**extra: Any) -> bytes:
    """A request as a hand-written client (no mqprimer) would write it."""
    return json.dumps({"specversion": "1.0", "id": "hand-1", "source": "urn:raw", "type": "raw.ask",
                       "datacontenttype": "application/json", "data": {"n": 7}, **extra}).encode()


def test_a_raw_pika_client_with_direct_reply_to_calls_an_mqprimer_worker() -> None:
    import pika

    from mqprimer.backends._amqp_link import Options, parameters

    url = need_broker("amqp")
    dest = f"rpc-raw-{uuid.uuid4().hex[:8]}"
    worker, th = _serve_in_thread(url, dest)
    u = mqprimer.URL.parse(url)
    conn = pika.BlockingConnection(parameters(u, Options.from_url(u), "raw rpc test"))
    try:
        ch = conn.channel()
        got: list[tuple[Any, bytes]] = []
        ch.basic_consume("amq.rabbitmq.reply-to", lambda c, m, p, b: got.append((p, b)), auto_ack=True)
        ch.queue_declare(dest, durable=True, arguments={"x-max-priority": 9})
        # only the AMQP properties say where to answer: the envelope has no mqreplyto
        ch.basic_publish("", dest, _cloudevent(),
                         pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id="corr-7"))
        deadline = time.monotonic() + 15
        while not got and time.monotonic() < deadline:
            conn.process_data_events(0.2)
        assert got, "no reply to the raw client"
        props, body = got[0]
        assert props.correlation_id == "corr-7"
        reply = json.loads(body)
        assert reply["data"] == {"echo": {"n": 7}} and reply["mqcorrelationid"] == "hand-1"
    finally:
        conn.close()
        worker.stop()
        th.join(20)


def test_a_hand_written_beanstalk_client_is_answered_through_the_envelope_alone() -> None:
    import greenstalk

    url = need_broker("beanstalk")
    dest = f"rpc-raw-{uuid.uuid4().hex[:8]}"
    back = f"rpc-raw-replies-{uuid.uuid4().hex[:8]}"
    worker, th = _serve_in_thread(url, dest)
    u = mqprimer.URL.parse(url)
    c = greenstalk.Client((u.host or "127.0.0.1", u.port or 11300), encoding=None, use=dest, watch=back)
    try:
        c.put(_cloudevent(mqreplyto=back))
        job = c.reserve(timeout=15)
        c.delete(job)
        reply = json.loads(job.body)
        assert reply["data"] == {"echo": {"n": 7}} and reply["mqcorrelationid"] == "hand-1"
    finally:
        c.close()
        worker.stop()
        th.join(20)


@pytest.mark.parametrize("backend", ["stomp-rabbitmq", "stomp-activemq"])
def test_stomp_a_reply_to_a_caller_that_has_gone_is_dropped_and_the_service_goes_on(backend: str) -> None:
    """ActiveMQ refuses a SEND to a deleted temporary queue (an ERROR that ends the connection);
    RabbitMQ takes it and drops it. Either way the service is not failed by a late reply."""
    url = need_broker(backend)
    dest = f"rpc-gone-{uuid.uuid4().hex[:8]}"
    with mqprimer.connect(url) as service, service.consumer(dest) as c:
        caller = mqprimer.connect(url)
        timed_out: list[BaseException] = []

        def call() -> None:
            try:
                caller.request(dest, "slow", timeout=1.0)
            except mqprimer.Timeout as exc:
                timed_out.append(exc)

        th = threading.Thread(target=call)
        th.start()
        m = c.receive(timeout=10)
        assert m is not None and m.reply_to is not None
        th.join(10)
        assert timed_out
        caller.close()  # its temporary queue is deleted with its connection
        m.reply("too late")  # no error: the caller has gone
        m.ack()
        with mqprimer.connect(url) as again:
            def answer() -> None:
                r = c.receive(timeout=10)
                assert r is not None
                r.reply("on time")
                r.ack()

            t = threading.Thread(target=answer)
            t.start()
            assert again.request(dest, "now", timeout=10).body == "on time"
            t.join(10)


@pytest.mark.timeout(120)
def test_example_rpc_on_the_embedded_sqlite_default(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"), TMPDIR=str(tmp_path))
    env.pop("MQPRIMER_URL", None)
    r = subprocess.run([sys.executable, "-m", "examples.rpc", "--count", "2"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("resized image-") == 2 and "resized image-0.png to 320x240" in r.stdout
    assert "missing.png: the service failed the request: no such image" in r.stdout


def test_gearman_requests_are_foreground_jobs_a_raw_client_and_a_failing_raw_worker_interoperate() -> None:
    """gearman request/reply is native: conn.request is a foreground SUBMIT_JOB whose reply is
    the WORK_COMPLETE data, so a raw pygearman client calls an mqprimer worker, and a raw
    worker's WORK_FAIL reaches the caller at once as RemoteError (not a timeout)."""
    import gearman  # pygearman

    from mqprimer.backends import _gearman_proto as gp

    url = need_broker("gearman")
    u = mqprimer.URL.parse(url)
    host, port = u.host or "127.0.0.1", u.port or 4730
    dest = f"rpc-fg-{uuid.uuid4().hex[:8]}"
    worker = mqprimer.Worker(url, dest, lambda m: {"echo": m.body}, idle_max=0.05, handle_signals=False)
    th = threading.Thread(target=worker.run, daemon=True)
    th.start()
    try:
        with mqprimer.connect(url) as conn:
            assert conn.capabilities.request_reply is NATIVE
            assert conn.request(dest, "hi", timeout=15).body == {"echo": "hi"}
            assert conn._replies is not None and conn._replies.path is not None
            assert conn._replies.path.address == "gearman:foreground"  # no reply function of its own
        client = gearman.GearmanClient([f"{host}:{port}"])
        req = client.submit_job(dest.encode(), encode(make(id="raw-1", source="urn:raw", type="t", body="raw",
                                                          reply_to="gearman:foreground")), poll_timeout=15)
        assert req.complete and decode(req.result).body == {"echo": "raw"}
        assert decode(req.result).correlation_id == "raw-1"
    finally:
        worker.stop()
        th.join(20)
    failing = f"rpc-fail-{uuid.uuid4().hex[:8]}"
    link = gp.Link(host, port, 5, 5)
    try:
        link.send(gp.packet(gp.CAN_DO, failing.encode()))
        with mqprimer.connect(url) as conn:
            errors: list[BaseException] = []

            def call() -> None:
                try:
                    conn.request(failing, "x", timeout=30)
                except BaseException as exc:
                    errors.append(exc)

            caller = threading.Thread(target=call)
            caller.start()
            start = time.monotonic()
            handle = b""
            while not handle:  # the raw worker grabs the job (NO_JOB until the request is in)
                assert time.monotonic() - start < 15, "the request never reached the raw worker"
                link.send(gp.packet(gp.GRAB_JOB_UNIQ))
                cmd, args = link.read()
                handle = args[0] if cmd == gp.JOB_ASSIGN_UNIQ else b""
            link.send(gp.packet(gp.WORK_FAIL, handle))
            caller.join(20)
            assert len(errors) == 1 and isinstance(errors[0], mqprimer.RemoteError), errors
            assert "WORK_FAIL" in errors[0].reason
            assert time.monotonic() - start < 10  # told by gearmand, not by the 30 s timeout
    finally:
        link.close()


def test_the_ids_kept_to_tell_a_duplicate_reply_are_bounded_and_not_rebuilt_per_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection remembers its last answered request ids (a second reply to one of them is a
    duplicate, not a late reply) in bounded memory, at a cost per request that does not grow:
    the set is made again from the bounded deque once per _REMEMBER requests (before, once
    the deque was full, on every request: a 4096-id set built per call)."""
    from mqprimer import _replies

    monkeypatch.setattr(_replies, "_REMEMBER", 32)
    queue = f"remember{uuid.uuid4().hex[:8]}"
    url = f"memory://remember-{uuid.uuid4().hex[:8]}"
    with mqprimer.connect(url) as conn, conn.consumer(queue) as c:
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                m = c.receive(timeout=0.05)
                if m is not None:
                    m.reply(m.body)
                    m.ack()

        th = threading.Thread(target=serve, daemon=True)
        th.start()
        try:
            sets: list[set[str]] = []  # kept alive, so that no two of them share an id()
            first = []
            for i in range(200):
                assert conn.request(queue, i, timeout=10).body == i
                replies: Any = conn._replies
                first.append(replies.answered[-1])
                if i >= 100 and not any(x is replies.answered_set for x in sets):
                    sets.append(replies.answered_set)
                assert len(replies.answered_set) <= 2 * 32
            # 100 requests at _REMEMBER 32: the set was made again 3-4 times, not 100 times
            assert len(sets) <= 5, f"the set of answered ids was made {len(sets)} times in 100 requests"
            assert set(first[-32:]) <= replies.answered_set, "a recent request's id was forgotten"
        finally:
            stop.set()
            th.join(5)
