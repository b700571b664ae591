"""Message ids: UUIDv7 form, uniqueness across threads and forked processes, time order."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

import pytest

from mqprimer import _ids

pytestmark = pytest.mark.timeout(60)

_UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_ids_are_uuid7_with_the_current_millisecond_and_a_matching_time() -> None:
    before = time.time_ns() // 1_000_000
    mid, now = _ids.stamp()
    after = time.time_ns() // 1_000_000
    assert _UUID7.match(mid), mid
    u = uuid.UUID(mid)
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert before <= u.int >> 80 <= after
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now)
    assert now == _ids._now_iso((u.int >> 80) * 1_000_000)


def test_ids_stay_unique_past_counter_wraps_and_across_threads() -> None:
    seen: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        for i in range(25_000):
            if i % 7 == 0:
                _ids.prepare()
            out.append(_ids.stamp()[0])

    threads = [threading.Thread(target=make, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    ids = [i for out in seen for i in out]
    assert len(ids) == 100_000  # 24 wraps of the 12-bit counter
    assert len(set(ids)) == len(ids)
    assert all(_UUID7.match(i) for i in ids)


def test_ids_are_ordered_by_millisecond() -> None:
    ids = [_ids.new_id() for _ in range(20_000)]
    ms = [int(i.replace("-", "")[:12], 16) for i in ids]
    assert ms == sorted(ms)


def test_a_prepared_stamp_from_a_past_millisecond_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_800_000_000_000 * 1_000_000]
    monkeypatch.setattr(_ids, "_time_ns", lambda: now[0])
    _ids._ready.clear()
    _ids.prepare()
    now[0] += 5_000_000  # 5 ms later
    mid, when = _ids.stamp()
    assert uuid.UUID(mid).int >> 80 == 1_800_000_000_005
    assert when.endswith(".005Z")
    _ids.prepare()
    same = _ids.stamp()  # within the same millisecond the prepared one is taken
    assert uuid.UUID(same[0]).int >> 80 == 1_800_000_000_005 and same[0] != mid
    assert not _ids._ready


def test_forked_processes_draw_their_own_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ids, "_time_ns", lambda: 1_800_000_000_000 * 1_000_000)  # one millisecond for both
    _ids._ready.clear()
    _ids.prepare()  # a stamp made ahead in the parent must not be handed out in the child too
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and exit without running pytest's teardown
        os.write(w, f"{_ids._offset} {_ids.stamp()[0]} {_ids.stamp()[0]}".encode())
        os._exit(0)
    os.close(w)
    child_offset, *child_ids = os.read(r, 200).decode().split()
    os.close(r)
    os.waitpid(pid, 0)
    parent_ids = [_ids.stamp()[0], _ids.stamp()[0]]
    assert int(child_offset) != _ids._offset
    assert not set(child_ids) & set(parent_ids)
    # the same counter values in both processes, told apart by the offset alone
    assert {i[15:18] for i in child_ids} & {i[15:18] for i in parent_ids}


def _fast_ids(frames: _ids.Frames, ms: int, count: int) -> list[str]:
    """Ids made the way Producer.send's fast path makes them (its lines, without a socket)."""
    out = []
    for _ in range(count):
        n = next(_ids._counter)
        st = frames.st
        if st[0] != ms or st[1] != n >> 12:
            st = frames.update(ms, n >> 12)
        out.append(f"{st[3]}{_ids._HEX3[n & 0xFFF]}{st[4]}")
    return out


def test_fast_path_ids_are_stamp_ids_and_a_forked_child_makes_its_own() -> None:
    # Producer.send's fast path caches the id's head and tail per millisecond in _ids.Frames;
    # a forked child must not reuse the parent's tail (its offset), or both make the same ids
    ms = 1_800_000_000_000
    frames = _ids.Frames(b'{"id":"%b","time":"%b","data":%b}')
    parent_first = _fast_ids(frames, ms, 3)
    assert all(_UUID7.match(i) for i in parent_first)
    assert uuid.UUID(parent_first[0]).int >> 80 == ms and frames.st[2].startswith(b'{"id":"')
    assert frames.st[2].endswith(b'","time":"' + _ids._now_iso(ms * 1_000_000).encode() + b'","data":%b}')
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and exit without running pytest's teardown
        os.write(w, " ".join(_fast_ids(frames, ms, 3)).encode())
        os._exit(0)
    os.close(w)
    child_ids = os.read(r, 200).decode().split()
    os.close(r)
    os.waitpid(pid, 0)
    parent_ids = _fast_ids(frames, ms, 3)
    assert len(child_ids) == 3 and all(_UUID7.match(i) for i in child_ids)
    assert not set(child_ids) & set(parent_ids)
    # the same counter values in both processes, told apart by the offset alone
    assert [i[15:18] for i in child_ids] == [i[15:18] for i in parent_ids]
