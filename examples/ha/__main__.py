"""High availability: ``python -m examples.ha [--url URL_A,URL_B]``.

One producer connects to two brokers (A first) and one worker consumes from both. Half
the events are sent with both brokers up (they go to A) and handled; then broker A goes
down, the producer fails over to B for the other half, and the worker, still subscribed
to both, handles them from B. (Messages still *in* a broker that is down wait there until
it comes back: failover keeps the system working, it does not move stored messages.)

With no ``--url`` the two "brokers" are two sqlite files, and "A goes down" is another
process holding A's write lock (sends to A fail exactly as to a stopped broker). With
real broker URLs, the example asks you to stop broker A (``--stop-a`` runs a command).
"""

from __future__ import annotations

import shlex
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import mqprimer
from examples._run import parser, run_id, say, start_worker, stop_workers, url_list, wait_for


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20, help="events to send (default 20)")
    p.add_argument("--stop-a", help="command that stops broker A (for real broker URLs)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mqprimer-ha-"))
    if args.url:
        urls = url_list(args.url)
        if len(urls) != 2:
            raise SystemExit("--url takes two comma-separated broker URLs: URL_A,URL_B")
    else:
        # a short busy_timeout: a locked file is "down" after 0.2 s instead of the default 5 s
        urls = [f"sqlite:///{work}/broker-{n}.db?busy_timeout=0.2" for n in "ab"]
    out = work / "handled"
    out.mkdir()
    queue = f"events.{run_id()}"
    half = args.events // 2
    with mqprimer.connect(urls) as conn:  # created now, so that broker A has its file before it "fails"
        say(f"brokers: A={conn.urls[0]}  B={conn.urls[1]}")
        worker = start_worker(",".join(urls), queue, "examples.ha.handler:record", env={"HA_OUT": str(out)})
        lock = None
        try:
            producer = conn.producer()
            ids = [producer.send(queue, {"n": i}) for i in range(half)]
            say(f"producer: sent {half} events with both brokers up")
            wait_for(lambda: len(list(out.iterdir())) == half, 60, "the first events handled", [worker])
            say(f"worker:   handled the first {half}")
            if args.url is None:
                lock = sqlite3.connect(urls[0].split("sqlite://", 1)[1].split("?")[0], isolation_level=None)
                lock.execute("BEGIN EXCLUSIVE")
                say("broker A: down (its database is locked by another process)")
            elif args.stop_a:
                subprocess.run(shlex.split(args.stop_a), check=True)
                say("broker A: stopped")
            else:
                input("stop broker A now, then press Enter ")
            ids += [producer.send(queue, {"n": i}) for i in range(half, args.events)]
            say(f"producer: sent {args.events - half} more events; they failed over to broker B")
            wait_for(lambda: len(list(out.iterdir())) == len(ids), 60, "every event handled", [worker])
        finally:
            if lock is not None:
                lock.execute("ROLLBACK")
                lock.close()
            codes = stop_workers([worker])
    handled = {f.name for f in out.iterdir()}
    say(f"worker:   handled {len(handled)}/{len(ids)} events from both brokers; exit code {codes[0]}")
    return 0 if handled == set(ids) and codes == [0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
