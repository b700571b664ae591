"""The reliability battery's moving parts: a counted producer/consumer stream and child processes.

Kept apart from :mod:`mqprimer.testing.battery` so that the battery reads as a list of faults.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import mqprimer
from mqprimer.backend import Topic
from mqprimer.errors import ConnectionFailed


class Stream:
    """One producer thread and one consumer thread on a queue, counting every message.

    The producer alternates the single-message ``send()`` path and ``send_many()`` batches
    of five, paced so that a fault lands in the middle; each id counts as confirmed once
    its call returned. The consumer acks what it gets and keeps going through lost
    connections (an ack racing a lost connection raises; the broker delivers it again).
    """

    def __init__(self, urls: str | Sequence[str], dest: str | Topic, total: int, *, pace: float = 0.002,
                 reconnect_timeout: float = 120.0, hold_at: int | None = None,
                 consumer_urls: str | Sequence[str] | None = None) -> None:
        self.urls, self.dest, self.total, self.pace = urls, dest, total, pace
        self.consumer_urls = urls if consumer_urls is None else consumer_urls
        self.reconnect_timeout = reconnect_timeout
        self.attempted = 0
        self.confirmed: list[str] = []
        self.confirmed_at: dict[str, float] = {}
        self.calls: list[tuple[float, float, list[str]]] = []  # (started, returned, ids) per send call
        self.received: list[str] = []
        self.received_at: dict[str, float] = {}
        self.single_after_fault = 0  # send() calls that returned after mark_fault()
        self.batch_after_fault = 0
        self.fault_at: float | None = None
        #: the producer waits at this many messages until mark_fault(), so the fault is
        #: always mid-stream however fast the backend is
        self.hold_at = hold_at
        self._faulted = threading.Event()
        self.errors: list[BaseException] = []
        self._produced = threading.Event()
        self._subscribed = threading.Event()  # a topic's messages reach only subscribers that exist
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._produce, daemon=True),
                         threading.Thread(target=self._consume, daemon=True)]

    def start(self) -> "Stream":
        self._threads[1].start()
        self._threads[0].start()
        return self

    def mark_fault(self) -> None:
        self.fault_at = time.monotonic()
        self._faulted.set()

    def _produce(self) -> None:
        try:
            with mqprimer.connect(self.urls, reconnect_timeout=self.reconnect_timeout) as conn:
                p = conn.producer()
                if not self._subscribed.wait(30):
                    raise AssertionError("the stream's consumer did not subscribe within 30 s")
                i = 0
                while i < self.total and not self._stop.is_set():
                    if self.hold_at is not None and i >= self.hold_at:
                        self._faulted.wait(120)
                    began = time.monotonic()
                    if i % 10 < 5:
                        self.attempted += 1
                        ids = [p.send(self.dest, {"i": i})]
                        single = True
                    else:
                        items = [p.build(self.dest, {"i": i + k}) for k in range(5)]
                        self.attempted += len(items)
                        ids = p.send_many(items)
                        single = False
                    now = time.monotonic()
                    if self.fault_at is not None and now > self.fault_at:
                        if single:
                            self.single_after_fault += 1
                        else:
                            self.batch_after_fault += 1
                    self.calls.append((began, now, ids))
                    for mid in ids:
                        self.confirmed_at[mid] = now
                    self.confirmed.extend(ids)
                    i += len(ids)
                    if self.pace:
                        time.sleep(self.pace)
        except BaseException as exc:  # reported by finish()
            self.errors.append(exc)
        finally:
            self._produced.set()

    def _consume(self) -> None:
        try:
            with mqprimer.connect(self.consumer_urls, reconnect_timeout=self.reconnect_timeout) as conn, \
                    conn.consumer(self.dest, prefetch=20) as c:
                self._subscribed.set()
                while not self._stop.is_set():
                    m = c.receive(timeout=0.3)
                    if m is None:
                        continue
                    self.received.append(m.id)
                    self.received_at.setdefault(m.id, time.monotonic())
                    try:
                        m.ack()
                    except ConnectionFailed:
                        pass  # received just before its connection died: it comes again
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self._subscribed.set()  # never leave the producer waiting

    def finish(self, timeout: float, settle: float = 3.0, expect_all: bool = True,
               drained: Callable[[], bool] | None = None, quiet: float = 10.0) -> None:
        """Wait for the producer, then until every confirmed message arrived (or ``timeout``;
        without ``expect_all``, an at-most-once backend, until nothing arrived for 5 s);
        then ``settle`` seconds more of nothing new, so late duplicates are counted too.

        ``drained`` (where the broker can tell) says the broker holds nothing more for the
        stream's queue (nothing ready, delayed or delivered-unsettled): after ``quiet`` seconds
        without a delivery it ends the wait for confirmed messages that are not coming, which
        then count as lost, instead of waiting out ``timeout`` for them."""
        deadline = time.monotonic() + timeout
        self._produced.wait(max(0.0, deadline - time.monotonic()))
        last, seen_at, asked_at = len(self.received), time.monotonic(), 0.0
        while time.monotonic() < deadline and not self.errors and not set(self.confirmed) <= set(self.received):
            time.sleep(0.05)
            now = time.monotonic()
            if len(self.received) != last:
                last, seen_at = len(self.received), now
            elif not expect_all and now - seen_at > 5:
                break
            elif drained is not None and now - seen_at > quiet and now - asked_at > 2:
                asked_at = now
                if drained() and len(self.received) == last:
                    break
        quiet_until = time.monotonic() + settle
        seen = len(self.received)
        while time.monotonic() < min(quiet_until, deadline + settle):
            time.sleep(0.05)
            if len(self.received) != seen:
                seen, quiet_until = len(self.received), time.monotonic() + settle
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(30)

    def recovery_s(self) -> float | None:
        """Seconds from the fault to the first delivery of a message confirmed after it."""
        if self.fault_at is None:
            return None
        after = [self.received_at[m] for m, t in self.confirmed_at.items()
                 if t > self.fault_at and m in self.received_at]
        return max(0.0, min(after) - self.fault_at) if after else None

    def in_flight_at_fault(self, slack: float = 0.5) -> set[str]:
        """Ids of the send calls under way when the fault was injected (just after
        :meth:`mark_fault`): the only ones the portable layer may have published twice."""
        if self.fault_at is None:
            return set()
        at = self.fault_at
        return {m for began, returned, ids in self.calls if began <= at + slack and returned >= at for m in ids}

    def duplicated_ids(self) -> set[str]:
        seen: set[str] = set()
        dup: set[str] = set()
        for m in self.received:
            (dup if m in seen else seen).add(m)
        return dup

    def figures(self) -> dict[str, Any]:
        unique = set(self.received)
        return {"sent": self.attempted, "confirmed": len(self.confirmed), "delivered": len(unique),
                "lost": len(set(self.confirmed) - unique), "duplicated": len(self.received) - len(unique),
                "recovery_s": self.recovery_s()}


# -- child processes -------------------------------------------------------------------------
HOLDER = """
import sys, time, mqprimer
conn = mqprimer.connect(sys.argv[1])
c = conn.consumer(sys.argv[2], prefetch=50)
held = []
while len(held) < int(sys.argv[3]):
    m = c.receive(timeout=20)
    if m is None:
        sys.exit("the holder got %d of %s messages" % (len(held), sys.argv[3]))
    held.append(m.id)
print(" ".join(held), flush=True)
time.sleep(600)
"""

#: receives one message, arms a SIGKILL of itself in the driver's ack, then retries or
#: dead-letters it: the process dies after the confirmed copy and before the ack
COPY_THEN_DIE = """
import os, signal, sys, mqprimer
url, queue, action = sys.argv[1:4]
conn = mqprimer.connect(url)
backend_cls = type(conn.endpoints[0].ensure())
original = backend_cls.subscribe
armed = []

def subscribe(self, *args, **kwargs):
    sub = original(self, *args, **kwargs)
    real_ack = sub.ack
    def ack(delivery):
        if armed:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_ack(delivery)
    sub.ack = ack
    return sub

backend_cls.subscribe = subscribe
c = conn.consumer(queue)
m = c.receive(timeout=20)
if m is None:
    sys.exit("no message")
armed.append(True)
if action == "retry":
    m.retry()
else:
    m.dead_letter("battery: killed between copy and ack")
sys.exit("survived the ack: the kill hook did not run")
"""

#: sends until killed, printing each confirmed id (send() and send_many() of 10 alternately)
WRITER = """
import sys, mqprimer
p = mqprimer.connect(sys.argv[1]).producer()
i = 0
while True:
    if i % 2:
        ids = p.send_many([(sys.argv[2], {"i": i, "k": k}) for k in range(10)])
    else:
        ids = [p.send(sys.argv[2], {"i": i})]
    print("\\n".join(ids), flush=True)
    i += 1
"""


def child(script: str, *args: str) -> "subprocess.Popen[str]":
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def reap(proc: "subprocess.Popen[str]") -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
