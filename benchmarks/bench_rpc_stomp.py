"""STOMP request/reply diagnostics beside bench_rpc.py (issue 13): where a round trip's wake-ups go.

Run: .venv/bin/python benchmarks/bench_rpc_stomp.py {stomp-rabbitmq,stomp-activemq} {raw,mq,handoff,persistent,ab}
         [--n 1000] [--many]
(broker URL from .run/brokers/urls)

50 warm-up then ``--n`` round trips, bench_rpc's service and caller in this one process:
raw = bench_rpc's raw stomp.py row (service answers on stomp.py's receiver thread, caller waits
on a queue its listener fills); mq = mqprimer (``consumer.receive()`` + ``reply()`` + ``ack()``
against ``conn.request()``); handoff = mqprimer with the waiting threads' reads off (every
frame read by the link's receiver thread and handed over, as before _stomp_wire.Reader.lead);
persistent = mqprimer with requests sent ``persistent:true``, as before _stomp_reply.TRANSIENT.
``--many``: 16 in flight (raw: 16 outstanding
SENDs on one connection; mqprimer: 16 caller threads), else sequential.

ab = wall clock: bench_rpc's mqprimer rows with the reads on and off, ``--rounds`` each,
alternating (on a shared machine only many rounds say anything).

Prints round trips/s, voluntary context switches (``getrusage``: one per thread that blocks
and is woken) and µs of CPU (every thread of the process) per round trip, the broker's CPU µs
per round trip (its process found by its listening port with ``ss``; the disk path of a
persistent message shows there, not here; other clients of the broker add to it), and the
switches per thread (``/proc/self/task/*/status``). For system calls and instructions per
round trip run it under ``strace -f -c`` or ``valgrind --tool=callgrind`` with ``--n N`` and
``--n 0`` and divide the difference by N.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_rpc  # noqa: E402
from _common import Result, broker_urls  # noqa: E402

import mqprimer  # noqa: E402
from mqprimer.backends import _stomp_reply, _stomp_wire  # noqa: E402

Counts = tuple[float, float, float, float, dict[str, float]]


def _threads() -> dict[str, int]:
    """Voluntary context switches so far, per thread of this process (name and id)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            status = Path(f"/proc/self/task/{tid}/status").read_text()
        except OSError:
            continue  # ended meanwhile
        out[f"{names.get(int(tid), 'thread')}:{tid}"] = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return out


BROKER_PID: int | None = None


def _broker_pid(url: str) -> int | None:
    port = mqprimer.URL.parse(url).port
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"pid=(\d+)", out)
    return int(m.group(1)) if m else None


def _broker_cpu() -> float:
    """The broker process's CPU seconds so far (0 when unknown)."""
    if BROKER_PID is None:
        return 0.0
    try:
        fields = Path(f"/proc/{BROKER_PID}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mark() -> tuple[int, float, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_nvcsw, time.perf_counter(), r.ru_utime + r.ru_stime, _broker_cpu()


def _loop(n: int, calls: int, one: Callable[[], None]) -> Counts:
    """(round trips/s, voluntary context switches and µs of CPU per round trip, switches per
    round trip of each thread) of ``calls`` calls of ``one`` making ``n`` round trips, after
    warm-up ones."""
    for _ in range(50 if calls > 1 else 1):
        one()
    per = _threads()
    sw, t, cpu, bcpu = _mark()
    for _ in range(calls):
        one()
    sw2, t2, cpu2, bcpu2 = _mark()
    after = _threads()
    m = max(n, 1)
    threads = {k: (v - per.get(k, 0)) / m for k, v in after.items() if v - per.get(k, 0)}
    return (n / (t2 - t) if n else 0.0), (sw2 - sw) / m, (cpu2 - cpu) * 1e6 / m, (bcpu2 - bcpu) * 1e6 / m, threads


def raw(url: str, n: int, many: bool) -> Counts:
    out: list[Counts] = []
    saved = bench_rpc._raw_rounds

    def rounds(name: str, k: int, one: Callable[[], None], burst: Callable[[int], None]) -> list[Result]:
        out.append(_loop(n, 1, lambda: burst(n)) if many else _loop(n, n, one))
        return []

    bench_rpc._raw_rounds = rounds
    try:
        bench_rpc.bench_raw_stomp(url, n)
    finally:
        bench_rpc._raw_rounds = saved
    return out[0]


def mq(url: str, n: int, many: bool) -> Counts:
    dest = f"bench-rpc-{uuid.uuid4().hex[:8]}"
    stop, ready = threading.Event(), threading.Event()
    th = threading.Thread(target=bench_rpc._serve_mq, args=(url, dest, stop, ready), daemon=True, name="service")
    th.start()
    ready.wait(30)
    try:
        with mqprimer.connect(url) as conn:
            def one() -> None:
                conn.request(dest, bench_rpc.BODY, timeout=30)

            if not many:
                return _loop(n, n, one)
            per = n // bench_rpc.INFLIGHT

            def burst() -> None:
                def caller() -> None:
                    for _ in range(per):
                        one()

                callers = [threading.Thread(target=caller, name=f"caller{i}") for i in range(bench_rpc.INFLIGHT)]
                for c in callers:
                    c.start()
                for c in callers:
                    c.join()

            for _ in range(20):
                one()
            return _loop(per * bench_rpc.INFLIGHT, 1, burst)
    finally:
        stop.set()
        th.join(10)


def ab(url: str, n: int, rounds: int) -> None:
    """bench_rpc's mqprimer rows (sequential, 16 in flight) with the waiting threads' reads on
    and off, alternating which goes first each round; prints each round and the medians."""
    got: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for r in range(rounds):
        for lead in (True, False) if r % 2 == 0 else (False, True):
            _stomp_wire.LEAD = lead
            try:
                seq, many = bench_rpc.bench_mqprimer(url, n)[:2]
            finally:
                _stomp_wire.LEAD = True
            got[lead].append((seq.rate, seq.p50_us or 0.0, many.rate))
            print(f"round {r + 1}, reads {'on ' if lead else 'off'}: sequential {seq.rate:.0f}/s "
                  f"(p50 {seq.p50_us or 0:.0f} µs), 16 in flight {many.rate:.0f}/s", flush=True)
    for lead, rows in got.items():
        print(f"reads {'on ' if lead else 'off'}: medians sequential {statistics.median(x[0] for x in rows):.0f}/s "
              f"(p50 {statistics.median(x[1] for x in rows):.0f} µs), "
              f"16 in flight {statistics.median(x[2] for x in rows):.0f}/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("broker", choices=["stomp-rabbitmq", "stomp-activemq"])
    ap.add_argument("mode", choices=["raw", "mq", "handoff", "persistent", "ab"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--many", action="store_true", help="16 in flight instead of one")
    ap.add_argument("--rounds", type=int, default=6, help="ab: rounds of each")
    args = ap.parse_args()
    url = broker_urls().get(args.broker)
    if url is None:
        raise SystemExit(f"no {args.broker} URL: run scripts/brokers up first")
    if args.mode == "ab":
        ab(url, args.n, args.rounds)
        return
    if args.mode == "handoff":
        _stomp_wire.LEAD = False
    if args.mode == "persistent":
        _stomp_reply.TRANSIENT = False
    global BROKER_PID
    BROKER_PID = _broker_pid(url)
    rate, switches, cpu, bcpu, threads = (raw if args.mode == "raw" else mq)(url, args.n, args.many)
    print(f"{args.broker} {args.mode}: {args.n} round trips {'16 in flight' if args.many else 'sequential'}, "
          f"{rate:.0f}/s, {switches:.2f} voluntary context switches and {cpu:.0f} µs of CPU each; "
          f"broker CPU {bcpu:.0f} µs each" + ("" if BROKER_PID else " (broker process not found)"), flush=True)
    for name, v in sorted(threads.items(), key=lambda kv: -kv[1]):
        if v >= 0.005:
            print(f"    {name:36s} {v:.2f}")


if __name__ == "__main__":
    main()
