"""The send fast paths (Producer.send on topics, send_many's pairs) keep build()'s bytes and refusals."""

from __future__ import annotations

import pytest

import mqprimer
from mqprimer.envelope import DEFAULT_TYPE, encode, make
from mqprimer.errors import MessageTooLarge


def test_send_many_pairs_write_what_build_writes() -> None:
    with mqprimer.connect("memory://fast-bytes") as conn:
        p = conn.producer()
        with conn.consumer("fastq") as c:
            body = {"path": "a.jpg", "n": 1, "u": "é%s"}
            [mid] = p.send_many([("fastq", body)])
            m = c.receive(timeout=5)
            assert m is not None and m.id == mid
            want = encode(make(id=mid, source=conn.source, type=DEFAULT_TYPE, body=body, time=m.time))
            assert m._delivery.payload == want
            m.ack()


def test_send_many_pair_over_the_size_limit_is_refused() -> None:
    with mqprimer.connect("memory://fast-size", max_message_size=300) as conn:
        p = conn.producer()
        p.send_many([("fastq", "x" * 10)])
        with pytest.raises(MessageTooLarge):
            p.send_many([("fastq", "x" * 400)])


def test_send_many_pair_with_a_body_json_cannot_hold_is_refused() -> None:
    with mqprimer.connect("memory://fast-body") as conn:
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            conn.producer().send_many([("fastq", {"s": object()})])


def test_topic_sends_after_a_good_one_still_check_each_name_and_size() -> None:
    with mqprimer.connect("memory://fast-topic", max_message_size=300) as conn:
        p = conn.producer()
        with conn.consumer(mqprimer.Topic("logs.#")) as c:
            p.send(mqprimer.Topic("logs.error"), 1)
            p.send(mqprimer.Topic("logs.error"), 2)
            with pytest.raises(ValueError, match="topic name"):
                p.send(mqprimer.Topic("logs.*"), 3)
            with pytest.raises(MessageTooLarge):
                p.send(mqprimer.Topic("logs.error"), "x" * 400)
            got = [c.receive(timeout=5) for _ in range(2)]
            assert [m.body for m in got if m is not None] == [1, 2]
            assert c.receive(timeout=0.1) is None
