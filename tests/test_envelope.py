"""The envelope: CloudEvents 1.0 structured JSON, total decoding, interop with the official SDK."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from mqprimer.envelope import decode, encode, make, replace
from mqprimer.errors import EnvelopeError, MessageTooLarge

pytestmark = pytest.mark.timeout(30)


def _env(body: Any, **kw: Any):  # type: ignore[no-untyped-def]
    return make(id="id-1", source="urn:test", type="t.happened", body=body, time="2026-11-27T10:00:00.123Z", **kw)


def test_json_body_is_in_data_and_required_attributes_are_written() -> None:
    doc = json.loads(encode(_env({"a": [1, 2]}, headers={"k": "v"}, attempt=2)))
    assert doc["specversion"] == "1.0" and doc["id"] == "id-1" and doc["source"] == "urn:test"
    assert doc["type"] == "t.happened" and doc["datacontenttype"] == "application/json"
    assert doc["data"] == {"a": [1, 2]} and "data_base64" not in doc
    assert doc["mqattempt"] == 2 and json.loads(doc["mqheaders"]) == {"k": "v"}


def test_bytes_body_is_in_data_base64() -> None:
    raw = b"\x00\xff\xfe binary"
    doc = json.loads(encode(_env(raw)))
    assert base64.b64decode(doc["data_base64"]) == raw and "data" not in doc
    assert decode(encode(_env(raw))).body == raw


def test_round_trip_keeps_everything() -> None:
    env = _env({"x": "ünïcødé 🐇"}, headers={"ключ": "значение", "": "empty key"}, attempt=3, expires=123,
               reason="bad", origin="q", error="ValueError: x")
    back = decode(encode(env))
    assert back == env and back.headers == {"ключ": "значение", "": "empty key"}


def test_official_sdk_reads_what_we_write() -> None:
    for body in ({"path": "a.jpg"}, b"\x89PNG\r\n"):
        event = JSONFormat().read(None, encode(_env(body, headers={"tenant": "acme"}, attempt=2)))
        assert isinstance(event, CloudEvent)
        assert (event.get_id(), event.get_source(), event.get_type()) == ("id-1", "urn:test", "t.happened")
        assert event.get_data() == body
        assert event.get_extension("mqattempt") == 2
        assert json.loads(event.get_extension("mqheaders")) == {"tenant": "acme"}


def test_we_read_what_the_official_sdk_writes() -> None:
    for data in ({"n": 1}, b"\x00\x01"):
        event = CloudEvent({"id": "sdk-1", "source": "urn:sdk", "type": "sdk.event", "traceparent": "00-abc-01"}, data)
        wire = JSONFormat().write(event)
        env = decode(wire)
        assert (env.id, env.source, env.type, env.body, env.attempt) == ("sdk-1", "urn:sdk", "sdk.event", data, 1)


def test_foreign_extensions_survive_a_re_encode() -> None:
    wire = JSONFormat().write(CloudEvent({"id": "a", "source": "s", "type": "t", "traceparent": "00-abc-01"}, {"n": 1}))
    env = decode(wire)
    again = json.loads(encode(replace(env, attempt=2), original=wire))
    assert again["traceparent"] == "00-abc-01" and again["mqattempt"] == 2


BAD: list[Any] = [
    b"", b"not json", b"\xff\xfe\xfd", b'"a string"', b"[]", b"null", b"{}", b"[" * 100_000 + b"]" * 100_000,
    b'{"specversion":"0.3","id":"a","source":"s","type":"t"}',
    b'{"specversion":"1.0","id":"","source":"s","type":"t"}',
    b'{"specversion":"1.0","id":"a","source":"s"}',
    b'{"specversion":"1.0","id":5,"source":"s","type":"t"}',
    b'{"specversion":"1.0","id":"a","source":"s","type":"t","data":1,"data_base64":"AA=="}',
    b'{"specversion":"1.0","id":"a","source":"s","type":"t","data_base64":"%%%"}',
    b'{"specversion":"1.0","id":"a","source":"s","type":"t","mqattempt":0}',
    b'{"specversion":"1.0","id":"a","source":"s","type":"t","mqattempt":"1"}',
    b'{"specversion":"1.0","id":"a","source":"s","type":"t","mqheaders":"{bad"}',
    b'{"specversion":"1.0","id":"a","source":"s","type":"t","mqheaders":"{\\"k\\":1}"}',
    b'{"specversion":"1.0","id":"a","source":"s","type":"t","data":"\xc3\x28"}',
    b'{"specversion":"1.0","id":"a","source":"s","type":"t","data":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "text that is a str", None, 42, object(),
]


@pytest.mark.parametrize("payload", BAD, ids=range(len(BAD)))
def test_decoding_is_total(payload: Any) -> None:
    with pytest.raises(EnvelopeError):
        decode(payload)


def test_oversize_input_is_an_envelope_error_and_oversize_output_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="over the limit"):
        decode(b"x" * 101, max_size=100)
    with pytest.raises(MessageTooLarge, match="1,000 bytes"):
        encode(_env("x" * 2000), max_size=1000)


def test_body_that_is_not_json_serialisable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="JSON"):
        encode(_env({"when": object()}))


def test_fuzzed_inputs_only_ever_raise_envelope_error() -> None:
    import random

    rng = random.Random(7)
    good = encode(_env({"a": [1, {"b": "c"}]}, headers={"h": "v"}))
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            decode(bytes(data))
        except EnvelopeError:
            pass


def test_rules_beyond_the_schema_hold_for_made_and_replaced_envelopes() -> None:
    # validate() replaced Envelope.__post_init__: every way in must still apply it
    with pytest.raises(ValueError, match="mqheaders must be a JSON object of strings"):
        _env("x", headers={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="both 'data' and 'data_base64'"):
        replace(_env({"a": 1}), data_base64=b"\x00")
    with pytest.raises(ValueError, match="mqheaders"):
        replace(_env({"a": 1}), headers_json='{"k": [1]}')
    assert replace(_env(b"\x00"), attempt=2).attempt == 2


@pytest.mark.parametrize("payload", [BAD[12], BAD[16], BAD[17]], ids=["data-and-base64", "headers-json", "headers-int"])
def test_a_received_envelope_that_breaks_those_rules_is_dead_lettered(payload: bytes) -> None:
    import mqprimer

    with mqprimer.connect(f"memory://envelope-rules-{BAD.index(payload)}") as conn:
        conn.endpoints[0].call("raw", lambda b: b.publish(mqprimer.Queue("rules"), payload, message_id="a"))
        mid = conn.producer().send("rules", "good", headers={"k": "v"})
        with conn.consumer("rules") as c:
            m = c.receive(timeout=5)
            assert m is not None and m.id == mid and m.headers == {"k": "v"}
            m.ack()
        dead = conn.dead_letters("rules").list()
        assert len(dead) == 1 and dead[0].body == payload
        assert "invalid envelope" in (dead[0].reason or "")
