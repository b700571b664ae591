"""Connection URLs: parsing, multi-host lists, and a password that never renders."""

from __future__ import annotations

import logging

import pytest

import mqprimer
from mqprimer import URL, InvalidURL, registry

pytestmark = pytest.mark.timeout(30)


def test_parse_full_url() -> None:
    u = URL.parse("amqp://user:p%40ss@127.0.0.1:5672/vhost?heartbeat=5&x=")
    assert (u.scheme, u.username, u.password) == ("amqp", "user", "p@ss")
    assert (u.host, u.port, u.path) == ("127.0.0.1", 5672, "/vhost")
    assert u.params == {"heartbeat": "5", "x": ""}


def test_password_never_renders() -> None:
    u = URL.parse("amqp://user:s3cret@h:1/")
    for text in (str(u), repr(u), f"{u}", u.render(), str([u])):
        assert "s3cret" not in text and "***" in text
    assert u.render(hide_password=False) == "amqp://user:s3cret@h:1/"


def test_password_stays_out_of_errors_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = "amqp://u:hunter2@127.0.0.1:1/" if _has("amqp") else "sqlite:////proc/nope/x.db"
    with pytest.raises(mqprimer.MQError) as info:
        mqprimer.connect(url)
    assert "hunter2" not in str(info.value) and "hunter2" not in caplog.text


def _has(scheme: str) -> bool:
    try:
        registry.get(scheme)
        return True
    except mqprimer.MQError:
        return False


def test_multi_host_split() -> None:
    u = URL.parse("beanstalk://127.0.0.1:11300,127.0.0.1:11301")
    assert [(x.host, x.port) for x in u.split_hosts()] == [("127.0.0.1", 11300), ("127.0.0.1", 11301)]


def test_ipv6_and_no_port() -> None:
    u = URL.parse("stomp://[::1]:61613/")
    assert (u.host, u.port) == ("::1", 61613)
    assert URL.parse("memory://name").host == "name" and URL.parse("memory://").host is None


def test_sqlite_paths() -> None:
    assert URL.parse("sqlite:///rel/x.db").path == "/rel/x.db"
    assert URL.parse("sqlite:////abs/x.db").path == "//abs/x.db"


@pytest.mark.parametrize(
    "text", ["", "localhost:5672", "amqp:/x", "://x", "amqp://h:port/", "amqp://h:70000/", "amqp://:5/", "amqp://[::1/"]
)
def test_malformed_urls_raise_invalid_url(text: str) -> None:
    with pytest.raises(InvalidURL):
        URL.parse(text)


def test_malformed_url_error_hides_password() -> None:
    with pytest.raises(InvalidURL) as info:
        URL.parse("amqp://u:topsecret@h:notaport/")
    assert "topsecret" not in str(info.value)


def test_url_is_immutable() -> None:
    u = URL.parse("memory://x")
    with pytest.raises(AttributeError):
        u.scheme = "amqp"  # type: ignore[misc]
