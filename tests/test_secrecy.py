"""No message content in errors and logs: a fuzz corpus whose every value carries a marker.

Decoding, a consumer that dead-letters the corpus (memory:// and sqlite://) and a worker
must never put the marker in an exception's text, a dead-letter reason or a log line at
any level. The same for the other error paths that see user data: URLs, headers, bodies.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import mqprimer
from mqprimer import URL, InvalidURL
from mqprimer.backend import Backend, Queue
from mqprimer.envelope import DEFAULT_MAX_SIZE, decode
from mqprimer.errors import EnvelopeError
from mqprimer.testing.helpers import wait_until
from mqprimer.worker import Worker

pytestmark = pytest.mark.timeout(60)

M = "SECRET-MARKER-7f3a"  # never a substring of anything mqprimer writes by itself


def _base() -> dict[str, object]:
    return {
        "specversion": "1.0", "id": f"{M}-id", "source": f"urn:{M}", "type": f"{M}.type", "time": f"{M}-time",
        "datacontenttype": f"{M}/json", "data": {M: [M, {M: M}]}, "mqheaders": json.dumps({M: M}),
        "mqreason": M, "mqorigin": M, "mqerror": M,
    }


def _doc(**changes: object) -> bytes:
    d = _base()
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return json.dumps(d).encode()


_DROP = object()


def corpus() -> list[bytes]:
    """Invalid envelopes, each carrying the marker in every value (and in the keys it can)."""
    out = [
        _doc(specversion=M), _doc(specversion=f"1.0{M}"), _doc(specversion=[M]), _doc(specversion={M: M}),
        _doc(id=[M]), _doc(id={M: M}), _doc(id=""), _doc(id=_DROP), _doc(source=[M]), _doc(type={M: 1}),
        _doc(type=""), _doc(time=[M]), _doc(datacontenttype={M: M}), _doc(mqattempt=M), _doc(mqattempt=0),
        _doc(mqattempt=[M]), _doc(mqexpires=M), _doc(mqexpires=1e400), _doc(mqheaders=M),
        _doc(mqheaders=json.dumps({M: 1})), _doc(mqheaders=json.dumps([M])), _doc(mqheaders={M: M}),
        _doc(mqheaders=json.dumps({M: {M: M}})), _doc(mqreason=[M]), _doc(mqorigin={M: M}), _doc(mqerror=7),
        _doc(data_base64=f"{M}!!"), _doc(data_base64=[M]), _doc(data_base64="QUJD"),  # both data and base64
        _doc(specversion=_DROP), _doc(source=_DROP, type=_DROP),
        json.dumps([M, {M: M}]).encode(), json.dumps(M).encode(), M.encode(), f"{{{M}}}".encode(),
        f'{{"{M}": "{M}"'.encode(), f'{{"specversion": "1.0", "id": "{M}\\uZZZZ"}}'.encode(),
        f'{{"specversion": "1.0", "id": "{M}"}} trailing {M}'.encode(),
        b"\xff\xfe" + M.encode(), M.encode() + b"\xc3\x28", _doc().replace(b'"1.0"', b"'1.0'"),
        (b"[" * 3000) + json.dumps(M).encode() + (b"]" * 3000), b"", b" " + M.encode(),
        json.dumps({"specversion": "1.0", "id": M, "source": M, "type": M, "data": M, "data_base64": M}).encode(),
    ]
    rng = random.Random(14)
    valid = _doc()
    for _ in range(150):  # truncations and byte flips of a valid envelope
        cut = rng.randrange(1, len(valid))
        out.append(valid[:cut])
        b = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.choice(b'"{}[]:,\\0a\xff ')
        out.append(bytes(b))
    return [p for p in out if _invalid(p)]


def _invalid(payload: bytes) -> bool:
    try:
        decode(payload)
    except EnvelopeError:
        return True
    return False


def _raw_publish(conn: mqprimer.Connection, queue: str, payload: bytes, mid: str) -> None:
    def put(b: Backend) -> None:
        b.publish(Queue(queue), payload, message_id=mid)

    conn.endpoints[0].call("raw publish", put)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record at every level, checked for the marker when the test ends (as a failure)."""
    caplog.set_level(logging.DEBUG)
    yield caplog


def _assert_clean_logs(caplog: pytest.LogCaptureFixture) -> None:
    assert caplog.handler.level <= logging.DEBUG
    for r in caplog.records:
        assert M not in r.getMessage(), f"marker in a {r.levelname} log line: {r.getMessage()[:200]}"
        assert M not in repr(r.__dict__), f"marker in the fields of a {r.levelname} log record"


def test_corpus_is_large_and_every_item_carries_the_marker() -> None:
    items = corpus()
    assert len(items) > 200
    assert sum(M.encode() in p for p in items) > 150


def test_decode_errors_name_the_field_never_the_value(logs: pytest.LogCaptureFixture) -> None:
    named = 0
    for payload in corpus():
        with pytest.raises(EnvelopeError) as info:
            decode(payload)
        text = str(info.value)
        assert M not in text and M[:6] not in text, f"{payload[:80]!r} -> {text}"
        named += "$." in text or "field `" in text or "mqheaders" in text
    assert named >= 20, "most schema errors should name the field"
    with pytest.raises(EnvelopeError, match=r"specversion.*1\.0|1\.0.*specversion") as info:
        decode(_doc(specversion="SECRET-PASSWORD-123"))
    assert "SECRET-PASSWORD-123" not in str(info.value)
    with pytest.raises(EnvelopeError, match="over the limit"):
        decode(M.encode() * 10, max_size=20)
    _assert_clean_logs(logs)


@pytest.mark.parametrize("scheme", ["memory", "sqlite"])
def test_consumer_dead_letters_the_corpus_without_quoting_it(
    scheme: str, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    url = f"memory://s{uuid.uuid4().hex[:8]}" if scheme == "memory" else f"sqlite:///{tmp_path}/s.db"
    items = corpus()[:60]
    with mqprimer.connect(url) as conn:
        q = "leaks"
        for i, payload in enumerate(items):
            _raw_publish(conn, q, payload, f"raw{i}")
        mid = conn.producer().send(q, "the good one")
        with conn.consumer(q, prefetch=20) as c:
            m = c.receive(timeout=10)
            assert m is not None and m.id == mid
            m.ack()
        dead = conn.dead_letters(q).list(limit=len(items) + 10)
    assert len(dead) == len(items)
    for e in dead:
        assert e.reason and e.reason.startswith("invalid envelope:")
        assert M not in e.reason and M not in (e.origin or "") and M not in e.id
    assert any("dead-lettering" in r.getMessage() for r in logs.records), "the dead letters were not logged"
    _assert_clean_logs(logs)


def test_worker_logs_no_content(logs: pytest.LogCaptureFixture) -> None:
    url = f"memory://w{uuid.uuid4().hex[:8]}"
    items = corpus()[:40]
    with mqprimer.connect(url) as conn:
        for i, payload in enumerate(items):
            _raw_publish(conn, "jobs", payload, f"r{i}")
        p = conn.producer()
        p.send("jobs", {M: M}, headers={M: M}, type="ok")
        p.send("jobs", {M: M}, headers={M: M}, type="fail")
        handled: list[str] = []

        def handle(msg: mqprimer.Message) -> None:
            handled.append(msg.type)
            if msg.type == "fail":
                raise ValueError("the handler failed")  # the handler's own text is its business

        w = Worker(url, "jobs", handle, retry=mqprimer.RetryPolicy(max_attempts=2, initial_delay=0, jitter=0),
                   handle_signals=False)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        wait_until(lambda: w.stats["dead-letter"] >= 1 and w.stats["ack"] >= 1, what="the worker's outcomes")
        w.stop()
        t.join(15)
        assert not t.is_alive()
        assert sorted(handled) == ["fail", "fail", "ok"]
        assert len(conn.dead_letters("jobs").list(limit=100)) == len(items) + 1
    assert logs.records, "the worker logged nothing"
    _assert_clean_logs(logs)


# -- other error paths that see user data -------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        f"user:{M}@127.0.0.1:5672",  # no scheme
        f"amqp://user:{M}/x@127.0.0.1:5672/",  # '/' in the password, not percent-encoded
        f"amqp://user:{M}#x@127.0.0.1/",  # '#'
        f"amqp://user:pw?{M}@127.0.0.1/",  # '?'
        f"amqp://user:{M}/",  # no host: the password reads as a port
        f"amqp://user:{M}@[::1/",
        f"amqp://user:{M}@h:99999/",
    ],
)
def test_url_errors_never_quote_the_url(text: str, logs: pytest.LogCaptureFixture) -> None:
    with pytest.raises(InvalidURL) as info:
        URL.parse(text)
    assert M not in str(info.value) and M[:6] not in str(info.value)
    assert "://" in str(info.value) or "scheme" in str(info.value)  # still says what is wrong
    _assert_clean_logs(logs)


def test_header_and_body_errors_never_quote_them(logs: pytest.LogCaptureFixture) -> None:
    with mqprimer.connect(f"memory://h{uuid.uuid4().hex[:8]}") as conn:
        p = conn.producer()
        bad_calls: list[Callable[[], object]] = [
            lambda: p.send("q", "x", headers={M: 1}),  # type: ignore[dict-item]
            lambda: p.send("q", "x", headers={M: f"\ud800{M}"}),
            lambda: p.send("q", {M: f"\ud800{M}"}),
            lambda: p.send("q", {(M, 1): M}),
            lambda: p.send("q", {M: object()}),
            lambda: p.send("q", {M: f"\ud800{M}"}, headers={"k": "v"}),
            lambda: p.build("q", {M: object()}),
        ]
        for call in bad_calls:
            with pytest.raises((TypeError, ValueError)) as info:
                call()
            assert M not in str(info.value), str(info.value)
    _assert_clean_logs(logs)


def test_oversize_error_names_sizes_not_content() -> None:
    with mqprimer.connect(f"memory://o{uuid.uuid4().hex[:8]}") as conn:
        with pytest.raises(mqprimer.MessageTooLarge) as info:
            conn.producer().send("q", M * (DEFAULT_MAX_SIZE // len(M) + 1))
    assert M not in str(info.value)


@pytest.mark.parametrize(
    "args",
    [
        ["send", "memory://x", "q", "body", "--header", f"Authorization {M}"],
        ["bridge", f"user:{M}@127.0.0.1:5672", "outbox", "memory://y", "orders"],
        ["send", f"amqp://user:{M}/x@127.0.0.1:5672/", "q", "body"],
    ],
    ids=["header-without-equals", "bridge-url-without-scheme", "url-with-slash-in-password"],
)
def test_cli_usage_errors_never_echo_the_argument(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "mqprimer.cli", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert M not in proc.stderr and M not in proc.stdout and "error" in proc.stderr
