"""beanstalkd's dead letters for the beanstalk backend: buried jobs, listed, replayed, purged.

The dead letters of queue ``q`` are every job in tube ``q.dead`` (buried; or ready, when a
crash interrupted a dead-lettering, and then buried by the next operation here) and the
buried jobs of tube ``q`` itself (copies too large for the server are buried in place, and
other beanstalkd clients bury there). See docs/backend-beanstalk.md.
"""

from __future__ import annotations

from collections.abc import Callable

import greenstalk

from ..backend import DeadLetterStore
from ..envelope import decode, encode, replace
from ..errors import EnvelopeError


class BuriedStore(DeadLetterStore):
    """Dead letters of ``queue``: every job in ``<queue>.dead`` and buried jobs in ``<queue>``.

    beanstalkd shows only the oldest buried job of a tube (``peek-buried``), so listing
    rotates the buried list once (reserve the head by id, bury it again at the tail) which
    leaves its order as it was. Each operation uses a connection of its own.
    """

    def __init__(self, connect: Callable[[], "greenstalk.Client[bytes]"], queue: str) -> None:
        self.connect = connect  # a new connection watching <queue>.dead
        self.queue = queue
        self.tubes = (f"{queue}.dead", queue)

    def _run(self, fn: Callable[["greenstalk.Client[bytes]"], int]) -> int:
        c = self.connect()
        try:
            _bury_ready(c)
            return fn(c)
        finally:
            c.close()

    def list(self, limit: int) -> list[bytes]:
        out: list[bytes] = []

        def run(c: "greenstalk.Client[bytes]") -> int:
            for tube in self.tubes:
                c.use(tube)
                for job in _rotate(c, tube):
                    if len(out) < limit:
                        out.append(job.body)
            return len(out)

        self._run(run)
        return out

    def replay(self, limit: int | None, ids: set[str] | None = None) -> int:
        def run(c: "greenstalk.Client[bytes]") -> int:
            n = 0
            for tube in self.tubes:
                c.use(tube)
                # with ids, every buried job is looked at once: the others go round to the tail
                for _ in range(_buried_count(c, tube) if ids is not None else 1 << 62):
                    if limit is not None and n >= limit:
                        break
                    try:
                        head = c.peek_buried()
                        st = c.stats_job(head)
                        job = c.reserve_job(head.id)  # ours now: a crash puts it back to ready in its tube
                    except greenstalk.NotFoundError:
                        if ids is None:
                            break
                        continue  # gone, or taken by another client meanwhile
                    body, mid = _fresh(job.body)
                    if ids is not None and mid not in ids:
                        c.bury(job, int(st["pri"]))
                        continue
                    c.use(self.queue)
                    c.put(body, int(st["pri"]), 0, int(st["ttr"]))
                    c.use(tube)
                    c.delete(job)
                    n += 1
            return n

        return self._run(run)

    def purge(self) -> int:
        def run(c: "greenstalk.Client[bytes]") -> int:
            n = 0
            for tube in self.tubes:
                c.use(tube)
                while True:
                    try:
                        c.delete(c.peek_buried())
                    except greenstalk.NotFoundError:
                        break
                    n += 1
            return n

        return self._run(run)


def _bury_ready(c: "greenstalk.Client[bytes]") -> None:
    """Bury the ready jobs of the watched dead-letter tube (left ready by a crash mid-way)."""
    while True:
        try:
            job = c.reserve(0)
        except (greenstalk.TimedOutError, greenstalk.DeadlineSoonError):
            return
        c.bury(job, int(c.stats_job(job)["pri"]))


def _buried_count(c: "greenstalk.Client[bytes]", tube: str) -> int:
    try:
        return int(c.stats_tube(tube)["current-jobs-buried"])
    except greenstalk.NotFoundError:
        return 0  # the tube does not exist (yet)


def _fresh(body: bytes) -> tuple[bytes, str | None]:
    """The payload to replay (attempt 1, no reason or origin) and its message id."""
    try:
        env = decode(body, max(len(body), 1))
    except EnvelopeError:
        return body, None  # not ours: replayed as it is
    return encode(replace(env, attempt=1, reason=None, origin=None), 1 << 62, original=body), env.id


def _rotate(c: "greenstalk.Client[bytes]", tube: str) -> list["greenstalk.Job[bytes]"]:
    """Every buried job of the used tube, oldest first; the buried list ends in its old order."""
    jobs: list[greenstalk.Job[bytes]] = []
    for _ in range(_buried_count(c, tube)):
        try:
            head = c.peek_buried()
        except greenstalk.NotFoundError:
            break
        if jobs and head.id == jobs[0].id:
            break  # a full turn (another client removed some meanwhile)
        pri = int(c.stats_job(head)["pri"])
        try:
            c.bury(c.reserve_job(head.id), pri)
        except greenstalk.NotFoundError:
            continue  # deleted or kicked by someone else meanwhile
        jobs.append(head)
    return jobs
