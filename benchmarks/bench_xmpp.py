"""xmpp:// against raw slixmpp on the same Prosody, in one run: publish -> receive.

Run: scripts/brokers up prosody && .venv/bin/python benchmarks/bench_xmpp.py [--n 3000] [--rounds 3] [--json]
(URL from .run/brokers/urls, or --url xmpp://...)

Each case publishes ``--n`` items to a fresh node with one subscriber attached and is timed
from the first publish to the last item received (p50/p99: per-item publish -> receive
latency). Nodes are made by mqprimer with the same configuration for both sides, transient
(``persist_items=0``) and persisted (``persist_items=1``, ``max_items=1000``, Prosody's sql
storage on SQLite):

- raw slixmpp: ``xep_0060.publish`` with 64 publishes in flight; the subscriber counts
  ``pubsub_publish`` events (payload: the same envelope bytes, as XEP-0335 JSON).
- mqprimer send_many: batches of 500 built messages (64 in flight inside a batch); the
  consumer receives and acks in another thread.
- mqprimer send: one confirmed publish at a time (a round trip each), for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import Result, broker_url, report  # noqa: E402
from slixmpp import ClientXMPP  # noqa: E402
from slixmpp.xmlstream import ET  # noqa: E402

import mqprimer  # noqa: E402
from mqprimer import Topic  # noqa: E402

BODY = {"user": "alice", "action": "signup", "plan": "pro", "n": 12345, "tags": ["a", "b"]}
WINDOW = 64


def _result(name: str, n: int, secs: float, lat: list[float]) -> Result:
    lat.sort()
    return Result(name, n, secs, lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6)


def raw(url: str, node: str, n: int, payload: bytes) -> Result:
    u = mqprimer.URL.parse(url)
    service = u.path.strip("/")
    text = payload.decode()

    def client(resource: str) -> ClientXMPP:
        x = ClientXMPP(f"{u.username}@localhost/{resource}", u.password or "")
        x.enable_direct_tls = x.enable_starttls = False
        x.enable_plaintext = True
        x.plugin["feature_mechanisms"].unencrypted_scram = True
        x.register_plugin("xep_0060")
        return x

    async def start(x: ClientXMPP) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def started(_: object) -> None:
            if not fut.done():
                fut.set_result(None)

        x.add_event_handler("session_start", started)
        x.connect(u.host, u.port)
        await asyncio.wait_for(fut, 10)

    sent: dict[str, float] = {}
    lat: list[float] = []
    ready = threading.Event()
    finished = threading.Event()

    async def subscriber() -> None:
        sub = client(f"bench-s-{uuid.uuid4().hex[:6]}")
        await start(sub)

        def on_item(msg: object) -> None:
            item_id = msg["pubsub_event"]["items"]["item"]["id"]  # type: ignore[index]
            lat.append(time.perf_counter() - sent[item_id])
            if len(lat) == n:
                finished.set()

        sub.add_event_handler("pubsub_publish", on_item)
        sub.send_presence(ppriority=-1)
        await sub.plugin["xep_0060"].subscribe(service, node, bare=False)  # type: ignore[no-untyped-call]
        ready.set()
        while not finished.is_set():
            await asyncio.sleep(0.01)
        await sub.disconnect()

    async def publisher() -> float:
        pub = client(f"bench-p-{uuid.uuid4().hex[:6]}")
        await start(pub)
        gate = asyncio.Semaphore(WINDOW)

        async def one(i: int) -> None:
            async with gate:
                el = ET.Element("{urn:xmpp:json:0}json")
                el.text = text
                item_id = f"r{i}"
                sent[item_id] = time.perf_counter()
                await pub.plugin["xep_0060"].publish(  # type: ignore[no-untyped-call]
                    service, node, id=item_id, payload=el)

        ready.wait(10)
        start_t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        finished.wait(120)
        secs = time.perf_counter() - start_t
        await pub.disconnect()
        return secs

    # subscriber and publisher on loops of their own, as mqprimer's sessions are
    t = threading.Thread(target=lambda: asyncio.run(subscriber()))
    t.start()
    try:
        secs = asyncio.run(publisher())
    finally:
        finished.set()  # the subscriber stops waiting, whatever happened to the publisher
        t.join()
    if len(lat) < n:
        raise SystemExit(f"raw slixmpp: {len(lat)} of {n} items arrived (was the server restarted meanwhile?)")
    return _result("raw slixmpp publish (64 in flight)", n, secs, lat)


def ours(url: str, topic: Topic, n: int, many: bool) -> Result:
    with mqprimer.connect(url) as conn, conn.consumer(topic, prefetch=100) as c:
        p = conn.producer()
        sent: dict[str, float] = {}
        got: dict[str, float] = {}

        def drain() -> None:
            while len(got) < n:
                m = c.receive(timeout=30)
                if m is None:
                    return
                got[m.id] = time.perf_counter()
                m.ack()

        reader = threading.Thread(target=drain)
        start = time.perf_counter()
        reader.start()
        if many:
            for i in range(0, n, 500):
                batch = [p.build(topic, BODY) for _ in range(min(500, n - i))]
                now = time.perf_counter()
                for it in batch:
                    sent[it.message_id] = now
                p.send_many(batch)
        else:
            for _ in range(n):
                t = time.perf_counter()
                mid = p.send(topic, BODY)
                sent.setdefault(mid, t)
        reader.join()
        secs = time.perf_counter() - start
    assert len(got) == n and got.keys() == sent.keys(), f"received {len(got)} of {n}"
    # a send() returns after its round trip, sometimes after the item arrived: latency >= 0
    lat = [max(got[i] - sent[i], 0.0) for i in got]
    return _result(f"mqprimer {'send_many (64 in flight)' if many else 'send (one at a time)'}", n, secs, lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    url = args.url or broker_url("xmpp", "prosody")
    with mqprimer.connect(url) as conn:
        payload = conn.producer().build(Topic("x"), BODY).payload
    for persist in ("0", "1"):
        u = mqprimer.URL.parse(url).with_query(persist=persist).render(hide_password=False)
        best: dict[str, Result] = {}
        for _ in range(args.rounds):
            root = f"bench{uuid.uuid4().hex[:8]}"
            with mqprimer.connect(u) as conn:  # the raw side's node, configured as mqprimer makes them
                conn.consumer(Topic(f"{root}.raw")).close()
            rows = [raw(u, f"{root}.raw", args.n, payload), ours(u, Topic(f"{root}.many"), args.n, True),
                    ours(u, Topic(f"{root}.one"), min(args.n, 1000), False)]
            for r in rows:
                if r.name not in best or r.rate > best[r.name].rate:
                    best[r.name] = r
        kind = "persisted (sql storage, max_items=1000)" if persist == "1" else "transient (persist_items=0)"
        report(f"xmpp publish -> receive, {kind} node, best of {args.rounds}", list(best.values()),
               [("mqprimer send_many (64 in flight)", "raw slixmpp publish (64 in flight)")])


if __name__ == "__main__":
    main()
