"""Portable API rules that hold whatever the backend: registry, options, defaults, errors."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import mqprimer
from mqprimer import BackendNotInstalled, ConfigurationError, RetryPolicy, Topic, UnknownScheme, registry
from mqprimer.envelope import decode
from mqprimer.registry import BackendSpec

pytestmark = pytest.mark.timeout(30)


def test_unknown_scheme_suggests_close_matches() -> None:
    with pytest.raises(UnknownScheme, match="amqp://") as info:
        mqprimer.connect("amqq://127.0.0.1/")
    assert "Known schemes" in str(info.value)


def test_backend_absent_from_this_version_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # a built-in scheme whose module is not shipped (as gearman://, zmq:// and xmpp:// were
    # while being written)
    monkeypatch.setitem(registry.BUILTIN, "absentq", BackendSpec("absentq", "mqprimer.backends.absentq:X", "absentq"))
    with pytest.raises(BackendNotInstalled, match="not available in this version"):
        mqprimer.connect("absentq://127.0.0.1:4730")


def test_missing_client_library_names_the_pip_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqp_fake_backend.py").write_text("import mqp_lib_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = BackendSpec("fakeq", "mqp_fake_backend:FakeBackend", "fakeq", "fakeq-client")
    monkeypatch.setitem(registry.BUILTIN, "fakeq", spec)
    with pytest.raises(BackendNotInstalled) as info:
        registry.get("fakeq")
    assert "pip install 'mqprimer[fakeq]'" in str(info.value) and "fakeq-client" in str(info.value)


def test_third_party_backend_found_through_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqp_third_party.py").write_text(textwrap.dedent("""
        from mqprimer.backends.memory import MemoryBackend
        class ThirdParty(MemoryBackend):
            pass
    """))
    dist = tmp_path / "mqp_third_party-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mqp-third-party\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[mqprimer.backends]\nthirdq = mqp_third_party:ThirdParty\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "thirdq" in registry.schemes()
    with mqprimer.connect("thirdq://tp") as conn:
        mid = conn.producer().send("q", 1)
        with conn.consumer("q") as c:
            m = c.receive(timeout=2)
            assert m is not None and m.id == mid
            m.ack()
    sys.modules.pop("mqp_third_party", None)


def test_unknown_url_option_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="colour"):
        mqprimer.connect("memory://x?colour=blue")


@pytest.mark.parametrize(
    "kwargs",
    [{"priority": 10}, {"priority": -1}, {"priority": 1.5}, {"delay": -1}, {"ttl": 0}, {"type": ""}, {"type": 5}],
)
@pytest.mark.parametrize("how", ["send", "build"])
def test_invalid_send_options(kwargs: dict[str, object], how: str) -> None:
    with mqprimer.connect("memory://opts") as conn, pytest.raises(ValueError):
        getattr(conn.producer(), how)("q", 1, **kwargs)


def test_send_writes_what_build_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """send()'s fast path writes the envelope bytes build() would, for the same id and time."""
    bodies: list[object] = [None, 0, -1.5, "", "ünï %s %b", [1, [2, {"x": None}]], {"a": {"b": ["c", True]}}]
    with mqprimer.connect("memory://same", source="urn:t%s ü") as conn:
        p = conn.producer()
        p.send("same", 0)
        backend = conn.endpoints[0].backend
        assert backend is not None
        sent: list[bytes] = []
        publish = backend.publish

        def spy(destination: object, payload: bytes, **kw: object) -> None:
            sent.append(payload)
            publish(destination, payload, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(backend, "publish", spy)
        for body in bodies:
            for kind in (None, "com.example.ünï%b"):
                p.send("same", body, type=kind, priority=3, delay=0)
                env = decode(sent[-1])
                assert env.body == body and env.type == (kind or "mqprimer.message")
                built = p.build("same", body, type=kind, id=env.id)
                assert env.time is not None and (built_time := decode(built.payload).time) is not None
                assert built.payload.replace(built_time.encode(), env.time.encode()) == sent[-1]
        assert len(sent) == 2 * len(bodies)


@pytest.mark.parametrize("dest", ["", "bad name", "x" * 201, "ünï"])
def test_invalid_queue_names(dest: str) -> None:
    with mqprimer.connect("memory://names") as conn, pytest.raises(ValueError, match="queue name"):
        conn.producer().send(dest, 1)


def test_wildcards_only_when_subscribing() -> None:
    with mqprimer.connect("memory://wild") as conn:
        with pytest.raises(ValueError, match="topic"):
            conn.producer().send(Topic("logs.*"), 1)
        conn.consumer(Topic("logs.#")).close()


def test_headers_must_be_strings() -> None:
    with mqprimer.connect("memory://h") as conn, pytest.raises(TypeError, match="headers"):
        conn.producer().send("q", 1, headers={"n": 1})  # type: ignore[dict-item]


def test_default_url_comes_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MQPRIMER_URL", "memory://from-env")
    with mqprimer.connect() as conn:
        assert str(conn.urls[0]) == "memory://from-env"
    monkeypatch.delenv("MQPRIMER_URL")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert mqprimer.default_url() == f"sqlite:///{tmp_path}/mqprimer/default.db"


def test_connection_closed_raises() -> None:
    conn = mqprimer.connect("memory://closed")
    conn.close()
    with pytest.raises(mqprimer.StateError):
        conn.producer()


def test_retry_policy_backoff() -> None:
    p = RetryPolicy(max_attempts=5, initial_delay=1, multiplier=2, max_delay=5, jitter=0)
    assert [p.delay_for(a) for a in (1, 2, 3, 4)] == [1, 2, 4, 5]
    assert p.should_retry(4) and not p.should_retry(5)
    jittered = RetryPolicy(initial_delay=10, jitter=0.1)
    assert all(9 <= jittered.delay_for(1) <= 11 for _ in range(100))
    for bad in ({"max_attempts": 0}, {"multiplier": 0.5}, {"jitter": 2}, {"initial_delay": -1}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


def test_handler_outcome_exceptions_choose_the_outcome() -> None:
    """A handler raising Retry(delay=...) gets its message again after that delay; one raising
    DeadLetter(reason) puts it in the dead letters with that reason."""
    import threading
    import time
    import uuid

    from mqprimer.testing.helpers import wait_until
    from mqprimer.worker import Worker

    url = f"memory://outcomes-{uuid.uuid4().hex[:8]}"
    with mqprimer.connect(url) as conn:
        p = conn.producer()
        retried, dead = p.send("jobs", "retry"), p.send("jobs", "dead")
        seen: dict[str, list[tuple[int, float]]] = {retried: [], dead: []}

        def handle(m: mqprimer.Message) -> None:
            seen[m.id].append((m.attempt, time.monotonic()))
            if m.body == "retry" and m.attempt == 1:
                raise mqprimer.Retry(delay=0.4)
            if m.body == "dead":
                raise mqprimer.DeadLetter("bad image")

        w = Worker(url, "jobs", handle, handle_signals=False)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        try:
            wait_until(lambda: w.handled >= 3, what="the retry and the dead letter")
        finally:
            w.stop()
            t.join(15)
        (a1, t1), (a2, t2) = seen[retried]
        assert (a1, a2) == (1, 2) and t2 - t1 >= 0.4 - 0.02, "Retry(delay=0.4) came back early"
        assert [a for a, _ in seen[dead]] == [1], "DeadLetter was retried"
        assert [(e.id, e.reason) for e in conn.dead_letters("jobs").list()] == [(dead, "bad image")]
