"""Save local first, push second: ``python -m examples.integrations [--url TARGET_URL] [--orders N]``.

The app writes each order to a local sqlite outbox, which works even when the central
broker is unreachable. ``mqprimer bridge`` then moves the outbox to the target URL
(default: $MQPRIMER_URL, else the embedded sqlite file), acking each message in the
outbox only after the target confirmed it. A consumer on the target reads the orders.

The bridge is what you would run under supervisord:

    mqprimer bridge sqlite:///outbox.db outbox amqp://user:pw@central/ orders
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import mqprimer
from examples._run import ROOT, parser, resolve_url, run_id, say, url_list


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--orders", type=int, default=10, help="orders the app saves (default 10)")
    p.add_argument("--outbox", help="the local outbox URL (default: sqlite in a temporary folder)")
    args = p.parse_args()
    target = resolve_url(args.url)
    outbox = args.outbox or f"sqlite:///{tempfile.mkdtemp(prefix='mqprimer-outbox-')}/outbox.db"
    orders_queue = f"orders.{run_id()}"

    # 1. the app: save locally, never blocked by the network
    with mqprimer.connect(outbox) as local:
        producer = local.producer()
        ids = [producer.send("outbox", {"order": i, "sku": f"SKU-{100 + i}", "qty": 1 + i % 3}, type="order.placed")
               for i in range(args.orders)]
    say(f"app:     saved {len(ids)} orders in the local outbox {outbox}")

    # 2. push: the bridge forwards and acks the outbox only after the target confirmed
    cmd = [sys.executable, "-m", "mqprimer.cli", "bridge", outbox, "outbox", target, orders_queue, "--timeout", "1"]
    say(f"bridge:  mqprimer bridge {outbox} outbox {mqprimer.URL.parse(url_list(target)[0])} {orders_queue}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    bridge = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    say(f"bridge:  {bridge.stdout.strip() or bridge.stderr.strip()} (exit {bridge.returncode})")

    # 3. the central side reads them
    received = []
    with mqprimer.connect(url_list(target)) as central, central.consumer(orders_queue) as consumer:
        while len(received) < len(ids):
            m = consumer.receive(timeout=10)
            if m is None:
                break
            received.append(m.id)
            m.ack()
    with mqprimer.connect(outbox) as local, local.consumer("outbox") as leftover:
        left = leftover.receive(timeout=0.5)
    say(f"central: received {len(received)} orders; outbox now {'empty' if left is None else 'NOT empty'}")
    ok = bridge.returncode == 0 and received == ids and left is None
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
