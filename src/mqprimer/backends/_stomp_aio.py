"""The asyncio twin's STOMP send on the event loop (backend.py's ``Backend.publish_async``).

A blocking send waits for its RECEIPT on the link's condition, set by stomp.py's receiver
thread: one OS wake-up. The twin's thread path costs three (loop -> pool thread -> the same
wait -> loop), and handing the RECEIPT to the loop with ``call_soon_threadsafe`` costs two
(the receiver thread wakes the loop's ``epoll``, whose callback then schedules the awaiting
task: 68-84 us measured, docs/backend-stomp.md). Here the SEND is written on the loop with
``MSG_DONTWAIT`` and the receiver thread writes the link's eventfd when the RECEIPT (or an
ERROR, or the loss) comes; the awaiting coroutine waits for that eventfd in the kernel
beside the loop's own selector fd while the loop has nothing else to do
(:func:`._loop_io.idle_readable`), so the RECEIPT wakes it directly, as it wakes a blocking
sender; with anything else to do the loop waits through its selector instead.

Never blocking the loop: the SEND goes out only when the link's write lock and stomp.py's
socket lock are both free at once (else :class:`NotNow`, nothing written: the thread path);
a rest the socket did not take keeps both locks and is written as the socket becomes
writable, through the selector. Cancelled after the SEND went out, the RECEIPT is dropped
when it comes (the link stays in step); cancelled inside a half-written frame, or past
``io_timeout`` without a RECEIPT, the connection is dropped (the portable layer reconnects).
"""

from __future__ import annotations

import asyncio
import os
import socket

from ..backend import NotNow
from ._loop_io import idle_readable, wait_fd
from ._stomp_link import ConnectionLost, Link, _broker_error
from ._stomp_wire import encode_frame

IDLE_WAIT = 0.02  # the longest kernel wait for a RECEIPT, and only while the loop is idle


def drop(link: Link) -> None:
    """Make a link out of step unusable at once (without waiting: shut its socket down); the
    next blocking call meets a lost connection and the portable layer reconnects."""
    link.alive = False
    try:
        link.conn.transport.socket.shutdown(socket.SHUT_RDWR)
    except Exception:
        pass


async def publish(link: Link, headers: dict[str, str], payload: bytes) -> None:
    """SEND ``payload`` with ``headers`` (the blocking path's) on ``link`` and await its RECEIPT."""
    if not link.alive or link.error is not None:
        raise NotNow("the link is not usable: the thread path says why")
    t = link.conn.transport
    sem = getattr(t, "_Transport__socket_semaphore", None)  # stomp.py's: its heart-beats take it
    sock = getattr(t, "socket", None)
    if sem is None or sock is None or not getattr(t, "blocking", False) or sock.gettimeout() is not None:
        raise NotNow("TLS (stomp.py's I/O thread writes), or not connected")
    wake = link.loop_waker()
    if wake is None:
        raise NotNow("no eventfd here")
    rid = link.next_id("a")
    headers["receipt"] = rid
    frame = encode_frame("SEND", headers, payload)
    with link.cond:
        link.awaited.add(rid)  # before the write: the RECEIPT may come before the wait starts
    try:
        rest = link.acks.send_nowait(sock, sem, frame)  # raises NotNow: nothing written
    except BaseException as exc:
        with link.cond:
            link.awaited.discard(rid)
        if isinstance(exc, OSError):
            raise ConnectionLost("the STOMP connection was lost") from exc
        raise
    done = False
    try:
        if rest:
            await _write_rest(link, sock, sem, rest)
        await _receipt(link, wake, rid)
        done = True
    finally:
        if not done:
            with link.cond:
                link.awaited.discard(rid)
                if rid in link.receipts:
                    link.receipts.discard(rid)
                else:
                    link.abandoned.add(rid)  # sent (or maybe): its RECEIPT is dropped when it comes


async def _write_rest(link: Link, sock: socket.socket, sem: object, rest: memoryview) -> None:
    """Write the rest of a frame the socket did not take at once; both locks are held (no other
    frame, nor a heart-beat, may land inside it) and released here."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + link.receipt_timeout
    ok = False
    try:
        while rest:
            if not await wait_fd(loop, sock.fileno(), True, deadline):
                raise ConnectionLost(f"the broker took no data within {link.receipt_timeout:g}s")
            try:
                rest = rest[sock.send(rest, socket.MSG_DONTWAIT):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                raise ConnectionLost("the STOMP connection was lost") from exc
        ok = True
    finally:
        if not ok:
            drop(link)  # the stream ends inside a frame
        sem.release()  # type: ignore[attr-defined]
        link.acks.lock.release()


async def _receipt(link: Link, wake: int, rid: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + link.receipt_timeout
    cond = link.cond
    while True:
        with cond:
            if rid in link.receipts:
                link.receipts.discard(rid)
                link.awaited.discard(rid)
                return
            if rid in link.receipt_errors:
                link.awaited.discard(rid)
                raise _broker_error(link.receipt_errors.pop(rid))
            if link.error is not None:
                raise _broker_error(link.error)
            if not link.alive:
                raise ConnectionLost("the STOMP connection was lost before the broker confirmed")
        now = loop.time()
        if now >= deadline:
            drop(link)  # a broker that stops answering is treated as gone
            raise ConnectionLost(f"no RECEIPT from the broker within {link.receipt_timeout:g}s")
        if not idle_readable(loop, wake, deadline, IDLE_WAIT):
            await wait_fd(loop, wake, False, min(deadline, now + IDLE_WAIT))
        try:
            os.eventfd_read(wake)
        except (BlockingIOError, OSError):
            pass
