"""The main job in one command: a producer and two worker processes on the embedded sqlite default.

    python -m examples.demo            # or --url amqp://..., or MQPRIMER_URL=...

The producer queues 20 jobs (count the words of a sentence), each with a ``reply-to``
header. Two ``mqprimer worker`` processes handle them, reply with the result and log
every outcome. One job is poison: it fails, is retried by the policy, and ends in the
dead-letter queue with its reason. Then the workers get SIGTERM, drain and exit 0.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import mqprimer
from examples._run import parser, resolve_url, run_id, say, start_workers, stop_workers, url_list, wait_for

SENTENCES = [
    "keep workers dumb", "one message type, one operation", "recycle workers to stop memory leaks",
    "sleep when the queue is idle", "handle signals and shut down properly", "run workers under supervisord",
    "spread workers over several brokers", "save local first, push second", "never put image bytes in a message",
    "a message queue decouples producers from consumers",
]
_replies: Any = None

# A worker process imports this module to find ``handle``, just before it subscribes: it leaves a
# mark, so the producer can wait for both workers before queueing (else, on a busy machine, the
# first worker up can take every job before the second has started, and the demo shows one).
if __name__ != "__main__" and os.environ.get("DEMO_READY_DIR"):
    open(os.path.join(os.environ["DEMO_READY_DIR"], str(os.getpid())), "w").close()


def handle(message: mqprimer.Message) -> None:
    """The worker's handler: count words, reply with the result. A ``None`` sentence fails."""
    global _replies
    text = message.body["text"]
    words = len(text.split())  # AttributeError on the poison job: retried, then dead-lettered
    time.sleep(0.2)  # pretend this is real work
    if _replies is None:
        _replies = mqprimer.connect(url_list(os.environ["MQPRIMER_URL"])).producer()
    _replies.send(message.headers["reply-to"], {"n": message.body["n"], "words": words, "worker": os.getpid()})


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    url = resolve_url(args.url)
    rid = run_id()
    jobs, replies = f"demo.{rid}.jobs", f"demo.{rid}.replies"
    ready = tempfile.mkdtemp(prefix="demo-ready.")
    with mqprimer.connect(url_list(url)) as conn:
        say(f"broker: {conn.urls[0]}  queue: {jobs}")
        # --prefetch 2: each worker holds only the jobs it is working on, so both share the queue
        workers = start_workers(2, url, jobs, "examples.demo:handle", "--concurrency", "2", "--prefetch", "2",
                                "--max-attempts", "3", "--retry-delay", "0.2", env={"DEMO_READY_DIR": ready})
        try:
            wait_for(lambda: len(os.listdir(ready)) >= 2, 60, "both workers to start", workers)
            producer = conn.producer()
            for n in range(20):
                text = None if n == 13 else SENTENCES[n % len(SENTENCES)]
                producer.send(jobs, {"n": n, "text": text}, headers={"reply-to": replies}, type="demo.count-words")
            say("producer: queued 20 jobs (job 13 is poison)")
            got: dict[int, dict[str, Any]] = {}
            with conn.consumer(replies) as consumer:
                deadline = time.monotonic() + 120
                while len(got) < 19 and time.monotonic() < deadline:
                    m = consumer.receive(timeout=1.0)
                    if m is not None:
                        got[m.body["n"]] = m.body
                        b = m.body
                        say(f"reply:    job {b['n']:2d} -> {b['words']} words (worker pid {b['worker']})")
                        m.ack()
            dead_letters = conn.dead_letters(jobs)
            dead: list[Any] = []

            def poison_is_dead() -> bool:
                dead[:] = dead_letters.list(10)
                return bool(dead)

            wait_for(poison_is_dead, 60, "the poison job in the dead-letter queue", workers)
        finally:
            codes = stop_workers(workers)
            shutil.rmtree(ready, ignore_errors=True)
    pids = {r["worker"] for r in got.values()}
    say(f"done:     {len(got)}/19 replies from {len(pids)} worker process(es); dead letters: {len(dead)}")
    for d in dead:
        say(f"dead:     {d.id}: {d.reason}")
    say(f"workers exited with {codes} after SIGTERM (0 = drained cleanly)")
    shown = ",".join(str(mqprimer.URL.parse(u)) for u in url_list(url))  # never print a password
    say(f"inspect:  mqprimer dead-letters '{shown}' {jobs} list")
    ok = len(got) == 19 and len(dead) == 1 and codes == [0, 0]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
