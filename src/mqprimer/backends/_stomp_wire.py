"""STOMP 1.2 frames on the wire: encoding, splitting received bytes into frames, and inboxes.

stomp.py's receiver costs more per MESSAGE than everything else a consumer does with it: it
parses each frame with regular expressions, copies its headers, and calls every listener
twice (``before_message``, ``message``), each call sorting the listener table under a lock.
:func:`split_frames` takes every complete frame of one socket read in one pass, and a
:class:`Reader` hands a subscription each read's MESSAGEs as one list
through an :class:`Inbox`: one queue hand-off (and at most one wake-up of the consumer)
per read instead of one per frame.

A thread waiting for its inbox reads the socket itself while the receiver thread is idle
(:meth:`Reader.lead`, docs/backend-stomp.md "Reads by the waiting thread"): a delivery then
wakes one thread, not the receiver and then the consumer.
"""

from __future__ import annotations

import queue
import re
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from stomp.exception import ConnectionClosedException, InterruptedException
from stomp.utils import parse_frame

#: waiting threads read the socket themselves while the receiver thread is idle (False: the
#: receiver thread reads every byte and hands each inbox's frames over, as before)
LEAD = True
_RECV = 65536  # bytes asked for per read (stomp.py asks for 16 KiB: a full prefetch took several)
_IDLE = 1.0  # the receiver's longest wait: it sees a transport stopped without a socket event

_ESCAPED = re.compile(r"\\.")
_UNESCAPE = {"\\r": "\r", "\\n": "\n", "\\c": ":", "\\\\": "\\"}


def _escape(value: str) -> str:
    if "\\" in value or ":" in value or "\n" in value or "\r" in value:
        value = value.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n").replace(":", "\\c")
    return value


def encode_frame(cmd: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A STOMP 1.2 frame (headers escaped; ``content-length`` whenever there is a body)."""
    if body:
        headers["content-length"] = str(len(body))
    head = "".join([cmd, "\n", *(f"{_escape(k)}:{_escape(v)}\n" for k, v in headers.items()), "\n"])
    return head.encode() + body + b"\x00"


def encode_ack(ack_id: str) -> bytes:
    """``encode_frame("ACK", {"id": ack_id})``, made for the one frame a consumer sends per message."""
    return b"ACK\nid:" + _escape(ack_id).encode() + b"\n\n\x00"


class Frame:
    """A received frame: what a delivery's tag keeps (stomp.py's Frame also copies its headers)."""

    __slots__ = ("cmd", "headers", "body")

    def __init__(self, cmd: str, headers: dict[str, str], body: bytes) -> None:
        self.cmd = cmd
        self.headers = headers
        self.body = body


def _unescape(text: str) -> str:
    if "\\\\" not in text:  # then every backslash starts an escape (ActiveMQ's ids: "ID\\c...")
        return text.replace("\\c", ":").replace("\\n", "\n").replace("\\r", "\r")
    return _ESCAPED.sub(lambda m: _UNESCAPE.get(m.group(), m.group()), text)


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The command and headers of a frame's head (STOMP 1.2: escaped, the first of repeats wins)."""
    text = head.decode("utf-8", "replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    escaped = "\\" in text and lines[0] != "CONNECTED"  # CONNECT and CONNECTED are never escaped
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if not sep or not key:
            continue
        if escaped and "\\" in line:
            key, value = _unescape(key), _unescape(value)
        if key not in headers:
            headers[key] = value
    return lines[0], headers


def split_frames(buf: bytes) -> tuple[list[tuple[str, dict[str, str], bytes, bytes]], int, int]:
    """The complete frames at the start of ``buf``, each as (command, headers, body, the raw
    frame without its NUL, except for a MESSAGE); where the unread rest begins; and how many bytes of that rest a frame
    whose ``content-length`` is known needs before trying again (0: unknown)."""
    frames: list[tuple[str, dict[str, str], bytes, bytes]] = []
    i, n = 0, len(buf)
    while i < n:
        if buf[i] in (10, 13):  # heartbeats, and the EOLs a broker may put after a frame
            i += 1
            continue
        # the blank line that ends the head: LF (the brokers here) or CRLF, both STOMP 1.2
        end = buf.find(b"\n\n", i)
        crlf = buf.find(b"\r\n\r\n", i, n if end < 0 else end)
        if crlf >= 0:
            end, start = crlf, crlf + 4
        elif end >= 0:
            start = end + 2
        else:
            break
        cmd, headers = parse_head(buf[i:end])
        length = headers.get("content-length", "")
        if length.isdigit():
            z = start + int(length)  # the body may hold NULs; its NUL follows it
            if z >= n:
                return frames, i, z + 1 - i
        else:
            z = buf.find(b"\x00", start)
            if z < 0:
                break
        frames.append((cmd, headers, buf[start:z], b"" if cmd == "MESSAGE" else buf[i:z]))
        i = z + 1
    return frames, i, 0


class Inbox:
    """A subscription's deliveries. The receiver thread puts each socket read's MESSAGE frames
    as one list (or an end marker); consumers take frames one at a time from ``ready``."""

    __slots__ = ("q", "ready")

    def __init__(self) -> None:
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.ready: deque[Any] = deque()

    def put(self, item: Any) -> None:
        self.q.put(item)

    def empty(self) -> bool:
        return not self.ready and self.q.empty()

    def qsize(self) -> int:
        """How many frames wait (taking the queued lists into ``ready``, as a consumer would)."""
        while True:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                break
            if type(item) is not list:
                self.q.put(item)  # an end marker: nothing is routed here after it
                break
            self.ready.extend(item)
        return len(self.ready)

    def drain(self) -> list[Any]:
        """Every frame waiting, end markers left out (what a closing subscription gives back)."""
        out = list(self.ready)
        self.ready.clear()
        while not self.q.empty():
            item = self.q.get_nowait()
            if type(item) is list:
                out += item
        return out


class Reader:
    """Takes the place of stomp.py's ``__read_frames`` (called by its I/O thread for every
    read): reads what the socket has, puts each inbox's MESSAGEs of that read in it as one list
    (``routes``: SUBSCRIBE id -> inbox, ``default`` for any other id) and hands every other
    frame to stomp.py, in order (a RECEIPT after MESSAGEs finds them in their inboxes).

    On a plain TCP socket the receiver thread waits for bytes in an epoll set of its own and
    holds :attr:`lock` at all other times; a thread waiting for its inbox (:meth:`lead`) takes
    the lock only without waiting, so only while the receiver sits in that wait, masks the
    socket out of the set (the receiver is not woken for the bytes it reads) and reads until
    its inbox has something, its wait ends, or the connection ends. Whoever reads runs
    :meth:`take`, so every frame is handled as before, on whichever thread. Unmasking lets
    epoll check the socket again: bytes that came meanwhile wake the receiver at once.
    """

    def __init__(self, conn: Any, routes: dict[str, Inbox], default: Inbox) -> None:
        self.conn = conn
        self.transport = conn.transport
        self.routes = routes
        self.default = default
        self.unread: list[bytes] = []  # bytes of frames not complete yet
        self.unread_len = 0
        self.need = 0  # bytes the next frame needs at least (its content-length); 0: unknown
        self.lock = threading.Lock()
        self.lock.acquire()  # the receiver's until it first waits (the end of its loop keeps it)
        self._ep: Any = None  # the receiver's epoll set: the socket alone
        self._poll: Any = None  # the leader's poll of the socket
        self._fd = -1
        self.leads = 0  # reads by waiting threads that brought bytes (the tests count them)
        self.leading = False  # a waiting thread reads now

    def install(self) -> None:
        t = self.transport
        if hasattr(t, "_BaseTransport__read_frames"):  # else stomp.py reads (Link.on_message routes)
            t._BaseTransport__read_frames = self.read

    def close(self) -> None:
        """The receiver's loop has ended (it keeps the lock: nobody leads any more)."""
        ep, self._ep = self._ep, None
        if ep is not None:
            ep.close()

    def read(self) -> None:
        t = self.transport
        if t.blocking and LEAD and hasattr(select, "epoll"):
            self._read_waiting(t)
            return
        while t.running:
            try:
                data = t.receive()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except InterruptedException:
                continue
            except Exception:
                data = b""  # as stomp.py: a failed read is a closed connection
            if not data:
                if not t.blocking:
                    return  # TLS: nothing more decrypted for now
                raise ConnectionClosedException()
            self.take(data)
            if t.blocking:
                return
            # TLS: the socket may hold decrypted bytes that select() does not show

    def _read_waiting(self, t: Any) -> None:
        """One turn of the receiver (lock held): wait without the lock, then read if nobody did."""
        sock = t.socket
        if sock is None:
            raise ConnectionClosedException()
        ep = self._ep
        if ep is None:
            self._fd = sock.fileno()
            ep = self._ep = select.epoll(1)
            ep.register(self._fd, select.EPOLLIN)
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLIN)
        self.lock.release()
        try:
            events = ep.poll(_IDLE)
        finally:
            self.lock.acquire()
        if not events or not t.running:
            return
        try:
            data = sock.recv(_RECV, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return  # a leader read them meanwhile, or only the wake-up came
        except OSError:
            data = b""
        if not data:
            raise ConnectionClosedException()
        self.take(data)

    def lead(self, q: Any, deadline: float, first: Callable[[], Any] | None = None) -> bool:
        """Read the socket on this thread until ``q`` has something or ``deadline`` (monotonic)
        passes: ``True``. ``False`` if it could not or must stop (the receiver is reading or
        gone, the connection ended): then the caller waits on ``q`` for the receiver.
        ``first`` (the waiting ACKs' write) runs once the socket is masked, so that what it
        makes the broker send next finds this thread reading, not the receiver's wait; what
        it raises, ``lead`` raises (after giving the socket back)."""
        if self._ep is None or not self.lock.acquire(False):
            return False
        ep, fd = self._ep, self._fd
        try:
            t = self.transport
            sock = t.socket
            if ep is None or not LEAD or not t.running or sock is None or sock.fileno() != fd:
                return False
            try:
                ep.modify(fd, 0)  # masked: the receiver's wait does not end for these bytes
            except OSError:
                return False
            self.leading = True
            if first is not None:
                try:
                    first()
                except BaseException:
                    self.leading = False
                    try:
                        ep.modify(fd, select.EPOLLIN)
                    except OSError:
                        pass  # closed meanwhile: see below
                    raise
            try:
                poll = self._poll.poll
                while q.empty():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return True
                    if not poll(int(left * 1000) + 1):
                        continue
                    try:
                        data = sock.recv(_RECV, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        return False  # the receiver sees the end once unmasked, and tells everyone
                    self.leads += 1
                    self.take(data)
                return True
            except Exception:
                # as the receiver's loop would: a connection that failed mid-read is lost
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return False
            finally:
                self.leading = False
                try:
                    ep.modify(fd, select.EPOLLIN)  # bytes or an end that came meanwhile wake the receiver
                except OSError:
                    # closed meanwhile (stomp.py's disconnect_socket, which told every waiter
                    # itself), its registration with it: the receiver ends at its next _IDLE
                    pass
        finally:
            self.lock.release()

    def take(self, data: bytes) -> None:
        self.unread.append(data)
        self.unread_len += len(data)
        self.conn.on_heartbeat()  # any byte from the broker shows it alive
        if self.unread_len < self.need:
            return
        buf = data if len(self.unread) == 1 else b"".join(self.unread)
        frames, used, self.need = split_frames(buf)
        rest = buf[used:]
        self.unread = [rest] if rest else []
        self.unread_len = len(rest)
        batches: dict[Inbox, list[Frame]] = {}
        routes, default = self.routes, self.default
        for cmd, headers, body, raw in frames:
            if cmd == "MESSAGE":
                box = routes.get(headers.get("subscription", ""), default)
                batch = batches.get(box)
                if batch is None:
                    batches[box] = batch = []
                batch.append(Frame(cmd, headers, body))
                continue
            for box, batch in batches.items():
                box.put(batch)
            batches.clear()
            f = parse_frame(raw)
            if f is not None:
                self.transport.process_frame(f, raw)
        for box, batch in batches.items():
            box.put(batch)
