"""Consumer groups on the real brokers: a member SIGKILLed mid-stream gives its unsettled
messages to the rest of the group (the conformance suite covers the clean cases)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import mqprimer
from conftest import ROOT, need_broker
from mqprimer import Topic
from mqprimer.backends._stomp_link import Link
from mqprimer.envelope import decode, encode, make

pytestmark = pytest.mark.timeout(60)

N = 40

# a member of the group in its own process: acks 3 messages, then holds 2 unsettled until killed
_MEMBER = """
import sys, mqprimer
from mqprimer import Topic
url, pattern, name = sys.argv[1:4]
with mqprimer.connect(url) as conn, conn.consumer(Topic(pattern), subscription=name, prefetch=5) as c:
    print("ready", flush=True)
    for i in range(5):
        m = c.receive(timeout=20)
        if m is None:
            print("starved", flush=True)
            sys.exit(1)
        if i < 3:
            m.ack()
            print("acked", m.id, flush=True)
        else:
            print("held", m.id, flush=True)
    print("holding", flush=True)
    sys.stdin.read()  # until SIGKILLed
"""


@pytest.fixture(params=["amqp", "stomp-rabbitmq", "stomp-activemq"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield need_broker(request.param)


def test_a_member_sigkilled_mid_stream_gives_its_unsettled_messages_to_the_group(url: str) -> None:
    root = f"g{time.time_ns() % 10**12}"
    pattern, name = Topic(f"{root}.orders.*"), f"{root}-billing"
    child = subprocess.Popen([sys.executable, "-c", _MEMBER, url, pattern.name, name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", f"the member process did not start ({child.wait(10)})"
        with mqprimer.connect(url) as conn, conn.consumer(pattern, subscription=name, prefetch=1) as mine:
            p = conn.producer()
            sent = {p.send(Topic(f"{root}.orders.created"), {"i": i}) for i in range(N)}
            acked: set[str] = set()
            held: set[str] = set()
            got: list[str] = []
            while True:  # meanwhile this member takes its share, one at a time
                m = mine.receive(timeout=0.05)
                if m is not None:
                    got.append(m.id)
                    m.ack()
                if m is None:
                    line = child.stdout.readline().split()
                    if line == ["holding"]:
                        break
                    assert line and line[0] in ("acked", "held"), f"the member process said {line}"
                    (acked if line[0] == "acked" else held).add(line[1])
            assert len(held) == 2
            child.kill()  # mid-stream: two messages unsettled, more of its share maybe prefetched
            child.wait(10)
            deadline = time.monotonic() + 30
            while not sent <= acked | set(got) and time.monotonic() < deadline:
                m = mine.receive(timeout=0.5)
                if m is not None:
                    got.append(m.id)
                    m.ack()
            assert sent <= acked | set(got), f"{len(sent - acked - set(got))} messages were lost with the member"
            assert held <= set(got), "the killed member's unsettled messages never reached the group"
            assert len(got) == len(set(got)), "the surviving member got a message twice"
            assert set(got) | acked == sent
            assert mine.receive(timeout=0.3) is None
    finally:
        child.kill()
        child.wait(10)


def test_a_raw_stomp_client_joins_an_activemq_group_and_publishes_to_it() -> None:
    """What docs/backend-stomp.md tells a client that is not mqprimer: send to
    /topic/VirtualTopic.<topic>, join group <name> by consuming /queue/Consumer.<name>.VirtualTopic.<pattern>."""
    url = need_broker("stomp-activemq")
    u = mqprimer.URL.parse(url)
    root = f"g{time.time_ns() % 10**12}"
    pattern, name = Topic(f"{root}.orders.*"), f"{root}-billing"
    with mqprimer.connect(url) as conn, conn.consumer(pattern, subscription=name, prefetch=1) as mine:
        raw = Link(u.host or "127.0.0.1", u.port or 61613, login=u.username, passcode=u.password, vhost="/",
                   heartbeat_ms=0)
        raw.open()
        try:
            rid = raw.next_id()
            raw.send_frame("SUBSCRIBE", {"destination": f"/queue/Consumer.{name}.VirtualTopic.{pattern.name}",
                                         "id": "raw", "ack": "client-individual", "activemq.prefetchSize": "1",
                                         "receipt": rid})
            raw.wait_receipts([rid])
            p = conn.producer()
            sent = {p.send(Topic(f"{root}.orders.created"), {"i": i}) for i in range(20)}
            # a raw SEND of an envelope to the virtual topic reaches the group too
            env = make(id="raw-sent", source="urn:raw", type="t", body={"raw": True})
            rid = raw.next_id()
            raw.send_frame("SEND", {"destination": f"/topic/VirtualTopic.{root}.orders.paid", "persistent": "true",
                                    "receipt": rid}, encode(env))
            raw.wait_receipts([rid])
            sent.add("raw-sent")
            mine_got: list[str] = []
            raw_got: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(mine_got) + len(raw_got) < len(sent) and time.monotonic() < deadline:
                m = mine.receive(timeout=0.05)
                if m is not None:
                    mine_got.append(m.id)
                    m.ack()
                frame = raw.get(0.05)
                if frame is not None:
                    raw_got.append(frame.body)
                    raw.ack(frame.headers["ack"])
            raw_ids = [decode(b).id for b in raw_got]
            assert sorted(mine_got + raw_ids) == sorted(sent), "the raw member and mqprimer did not split the group"
            assert mine_got and raw_ids, "one member of the mixed group got every message"
        finally:
            raw.close()
