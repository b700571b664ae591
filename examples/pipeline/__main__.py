"""Parallel pipeline on ZeroMQ: ``python -m examples.pipeline [--workers 3] [--tasks 100]``.

The seed talk's pipeline (and the zguide's "divide and conquer")::

    producer (PUSH, binds :P)  ──►  worker 1..N (mqprimer worker, PULL connects)  ──►  sink (PULL, binds :Q)
     zmq+tcp://127.0.0.1:P?bind=producer                       zmq+tcp://127.0.0.1:Q (the consumer binds)

No broker: the producer's PUSH socket deals tasks round-robin to the workers connected at that
moment, so it first sends warm-up tasks one at a time until every worker has answered (a worker
that connects late would otherwise miss the batch: the zguide's slow joiner). Then the batch
goes out, the sink collects one result per task and shows how the work was shared, and SIGTERM
drains the workers. At-most-once: a worker killed here would lose the tasks it had buffered
(add ``&ack=1`` to the tasks URL for the acknowledged mode, where the producer re-sends them).
"""

from __future__ import annotations

import socket
import time
from collections import Counter

import mqprimer
from examples._run import parser, say, start_workers, stop_workers, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument("--tasks", type=int, default=100, help="tasks in the batch (default 100)")
    args = p.parse_args()
    # send_timeout: the first send waits while no worker is connected yet (a bound PUSH blocks)
    tasks_url = args.url or f"zmq+tcp://127.0.0.1:{free_port()}?bind=producer&send_timeout=60"
    sink_url = f"zmq+tcp://127.0.0.1:{free_port()}"
    if not tasks_url.startswith("zmq+"):
        raise SystemExit("this example is about ZeroMQ: give a zmq+tcp:// or zmq+ipc:// URL with ?bind=producer")
    say(f"producer: {tasks_url}  sink: {sink_url}")
    with mqprimer.connect(tasks_url) as tasks, mqprimer.connect(sink_url) as sink_conn, \
            sink_conn.consumer("results", prefetch=100) as sink:
        producer = tasks.producer()
        workers = start_workers(args.workers, tasks_url, "tasks", "examples.pipeline.handler:work",
                                "--concurrency", "1", env={"PIPELINE_SINK": sink_url}, quiet=True)
        results: dict[int, int] = {}

        def drain() -> None:
            while (m := sink.receive(timeout=0.05)) is not None:
                results[m.body["task"]] = m.body["worker"]
                m.ack()

        try:
            warm = -2

            def every_worker_answered() -> bool:
                nonlocal warm
                drain()
                if len(set(results.values())) < args.workers:
                    producer.send("tasks", {"task": warm, "ms": 0})
                    warm -= 1
                    return False
                return True

            wait_for(every_worker_answered, 60, "every worker to connect", workers)
            say(f"producer: all {args.workers} workers connected; sending {args.tasks} tasks")
            start = time.monotonic()
            for i in range(args.tasks):
                producer.send("tasks", {"task": i, "ms": 10})
            wait_for(lambda: drain() or all(i in results for i in range(args.tasks)), 120,
                     "every task's result", workers)
            took = time.monotonic() - start
        finally:
            codes = stop_workers(workers)
    share = Counter(results[i] for i in range(args.tasks))
    say(f"sink:     {args.tasks}/{args.tasks} results in {took:.2f}s (10 ms of work each, "
        f"{args.tasks * 0.01:.1f}s serially)")
    for pid, n in sorted(share.items()):
        say(f"sink:     worker pid {pid}: {n} tasks")
    say(f"workers exited with {codes} after SIGTERM")
    ok = len(share) == args.workers and codes == [0] * args.workers
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
