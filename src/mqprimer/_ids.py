"""Message ids and timestamps, made cheaply on the send path.

The send path runs right after a blocking round trip to the broker, when this VM's CPU
caches are cold: there every bytecode costs ~5x what it costs in a tight loop (measured:
the old ``new_id`` took 1.4 us hot and 6.3 us after a beanstalkd ``put``). So the work
that changes once per millisecond (the id's time bits, the ISO timestamp) is done once per
millisecond, and what is left per message is a counter and one f-string.
"""

from __future__ import annotations

import itertools
import os
import random
import time
import weakref

_time_ns = time.time_ns
_MASK62 = (1 << 62) - 1

# Every id takes one number n from a process-wide counter (next() on it is atomic), and is
# a function of (millisecond, n): 12 bits of n, then 62 bits that are this process's
# random offset plus n // 4096. Two ids of one process never share n, so they never
# collide, whatever the threads do; processes differ by their offsets (random, redrawn in
# a forked child). The caches below are tuples replaced whole, so a thread never reads
# half of an update.
_counter = itertools.count()
_offset = random.SystemRandom().getrandbits(62)
# (ms, id prefix "tttttttt-tttt-7", ISO time "YYYY-MM-DDTHH:MM:SS.mmmZ", the same as ASCII bytes)
_ms_cache: tuple[int, str, str, bytes] = (-1, "", "", b"")
_sec_cache: tuple[int, str] = (-1, "")  # (second, "YYYY-MM-DDTHH:MM:SS")
_hi_cache: tuple[int, str] = (-1, "")  # (ms >> 16, the id's first 9 characters "tttttttt-")
# (n // 4096, the id's last 18 characters "-vrrr-rrrrrrrrrrrr")
_tail_cache: tuple[int, str] = (-1, "")
# the counter's 12 bits as 3 hex digits: a lookup, not a format spec parsed per id
_HEX3 = tuple(f"{i:03x}" for i in range(4096))
# the per-millisecond update is lookups too: a callgrind run is slow enough that a new
# millisecond comes every few sends, where format specs cost a quarter of a send
_HEX2 = tuple(f"{i:02x}" for i in range(256))
_MS3 = tuple(f".{i:03d}Z" for i in range(1000))
_HEX3B = tuple(h.encode() for h in _HEX3)


def _reset_after_fork() -> None:
    global _offset, _tail_cache
    _offset = random.SystemRandom().getrandbits(62)
    _tail_cache = (-1, "")
    _ready.clear()  # made with the parent's offset
    for frames in list(_all_frames):
        frames.st = _STALE  # their ids' tails carry the parent's offset


os.register_at_fork(after_in_child=_reset_after_fork)


def _set_ms(ms: int) -> tuple[int, str, str, bytes]:
    global _ms_cache, _sec_cache, _hi_cache
    sec = ms // 1000
    d = _sec_cache
    if d[0] != sec:
        d = _sec_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    hi = _hi_cache
    if hi[0] != ms >> 16:
        hi = _hi_cache = (ms >> 16, f"{ms >> 16:08x}-")
    iso = d[1] + _MS3[ms % 1000]
    c = _ms_cache = (ms, hi[1] + _HEX2[ms >> 8 & 255] + _HEX2[ms & 255] + "-7", iso, iso.encode())
    return c


def _set_tail(epoch: int) -> tuple[int, str]:
    global _tail_cache
    h = f"{(_offset + epoch) & _MASK62 | 0x2 << 62:016x}"  # variant 0b10 in the top two bits
    t = _tail_cache = (epoch, f"-{h[:4]}-{h[4:]}")
    return t


def _fresh(ms: int) -> tuple[str, str]:
    c = _ms_cache
    if ms != c[0]:
        c = _set_ms(ms)
    n = next(_counter)
    t = _tail_cache
    if n >> 12 != t[0]:
        t = _set_tail(n >> 12)
    return f"{c[1]}{_HEX3[n & 0xFFF]}{t[1]}", c[2]


# One stamp made ahead by prepare(), tagged with its millisecond; a list, because pop()
# hands it to exactly one thread.
_ready: list[tuple[int, str, str]] = []


def prepare() -> None:
    """Make the next :func:`stamp` ahead of time, if none is waiting.

    Drivers call this after writing a message and before blocking on the broker's reply:
    the work then runs while the broker works, with warm caches, instead of after the
    reply, when it costs ~5x. A stamp whose millisecond has passed is not used.
    """
    if not _ready:
        ms = _time_ns() // 1_000_000
        _ready.append((ms, *_fresh(ms)))


def stamp() -> tuple[str, str]:
    """A new message id and the current time as RFC 3339 UTC with milliseconds.

    The id is a UUID version 7 (RFC 9562, "fixed-length dedicated counter" method): 48-bit
    Unix milliseconds, 12 bits of a process-wide counter, then 62 bits that are a random
    per-process offset plus the rest of the counter. Ids never repeat within a process,
    whatever its threads do, and differ across processes by their offsets. They sort by
    their millisecond, which keeps index inserts local in stores keyed by id (sqlite's
    batches run ~2x faster than with random v4 ids).
    """
    ms = _time_ns() // 1_000_000
    if _ready:
        try:
            made = _ready.pop()
        except IndexError:  # another thread took it
            return _fresh(ms)
        if made[0] == ms:
            return made[1], made[2]
    # _fresh(ms), inline: one call less on every send
    c = _ms_cache
    if ms != c[0]:
        c = _set_ms(ms)
    n = next(_counter)
    t = _tail_cache
    if n >> 12 != t[0]:
        t = _set_tail(n >> 12)
    return f"{c[1]}{_HEX3[n & 0xFFF]}{t[1]}", c[2]


def wire() -> tuple[str, bytes]:
    """:func:`stamp` for the send fast path: the time already as the ASCII bytes the envelope
    template takes (encoded once a millisecond, not per message). Ids come from the same
    counter, so they never repeat with :func:`stamp`'s."""
    ms = _time_ns() // 1_000_000
    c = _ms_cache
    if ms != c[0]:
        c = _set_ms(ms)
    n = next(_counter)
    t = _tail_cache
    if n >> 12 != t[0]:
        t = _set_tail(n >> 12)
    return f"{c[1]}{_HEX3[n & 0xFFF]}{t[1]}", c[3]


# Frames.st before its first update (and in a forked child): matches no millisecond
_STALE: tuple[int, int, bytes, str, str] = (-1, -1, b"", "", "")
_ID_AT, _TIME_AT, _BODY_AT = b"\xff\x01", b"\xff\x02", b"\xff\x03"  # never in UTF-8 (the frame's name and JSON are)


class Frames:
    """The send fast path's envelope format with this millisecond's id and time filled in.

    ``fmt % (id, time, body)`` (ASCII bytes, JSON body) is a frame; ``st`` is ``(ms, block,
    fmt2, id head, id tail)`` where ``fmt2 % (_HEX3B[n & 0xFFF], body)`` is the same frame for
    the id of counter value ``n`` (``n >> 12 == block``), whose text is ``head + _HEX3[n &
    0xFFF] + tail``: one two-spec format per message instead of making the id and time
    (tuple, f-string, encode) and a three-spec one. ``st`` is replaced whole, never mutated,
    so a thread always reads a consistent one; a forked child resets every one (its ids
    take its own offset).
    """

    __slots__ = ("fmt", "st", "_parts", "__weakref__")

    def __init__(self, fmt: bytes) -> None:
        self.fmt = fmt
        self.st = _STALE
        # fmt split around its id and time, every other % escaped again, the body's spec kept
        before, _, rest = (fmt % (_ID_AT, _TIME_AT, _BODY_AT)).replace(b"%", b"%%").partition(_ID_AT)
        between, _, after = rest.partition(_TIME_AT)
        self._parts = (before, between, after.replace(_BODY_AT, b"%b"))
        _all_frames.add(self)

    def update(self, ms: int, block: int) -> tuple[int, int, bytes, str, str]:
        c = _ms_cache
        if c[0] != ms:
            c = _set_ms(ms)
        t = _tail_cache
        if t[0] != block:
            t = _set_tail(block)
        head, tail = c[1], t[1]
        p = self._parts
        st = self.st = (ms, block, p[0] + f"{head}%b{tail}".encode() + p[1] + c[3] + p[2], head, tail)
        return st


_all_frames: weakref.WeakSet[Frames] = weakref.WeakSet()


def new_id() -> str:
    """A new time-ordered message id (see :func:`stamp`)."""
    return stamp()[0]


def _now_iso(ns: int | None = None) -> str:
    """RFC 3339 UTC time with milliseconds (``ns``: epoch nanoseconds, default now)."""
    ms = (_time_ns() if ns is None else ns) // 1_000_000
    sec = ms // 1000
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(sec))}.{ms % 1000:03d}Z"
