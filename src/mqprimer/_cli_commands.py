"""The CLI's short commands: send, consume, status, dead-letters, doctor, backends, bench."""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid
from typing import Any

from ._cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    emit,
    non_negative,
    positive_int,
    progress_for,
    show_url,
    split_url,
)

_BATCH = 100  # messages per confirmed batch in bulk sends


def _dest(name: str, topic: bool) -> Any:
    from .backend import Topic

    return Topic(name) if topic else name


def message_dict(env: Any, *, body: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"id": env.id, "type": env.type, "attempt": env.attempt, "time": env.time,
                           "source": env.source, "headers": env.headers}
    for key in ("reason", "origin", "error"):
        if getattr(env, key, None):
            out[key] = getattr(env, key)
    if body:
        b = env.body
        out["body" if not isinstance(b, bytes) else "body_base64"] = (
            base64.b64encode(b).decode() if isinstance(b, bytes) else b
        )
    return out


def _body_text(b: Any) -> str:
    if isinstance(b, bytes):
        return f"<{len(b)} bytes>"
    return json.dumps(b, ensure_ascii=False)


# -- send --------------------------------------------------------------------------------
def add_send(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("send", parents=[common], help="send messages",
                       description="Send one message (BODY or --file) or one message per JSON line on stdin.")
    p.add_argument("pos", nargs="*", metavar="[URL] DEST [BODY]")
    p.add_argument("--file", "-f", help="read the body from this file (JSON if it parses, else text or bytes)")
    p.add_argument("--text", action="store_true", help="the body is text, not JSON (also for stdin lines)")
    p.add_argument("-H", "--header", action="append", default=[], metavar="KEY=VALUE", help="a header (repeatable)")
    p.add_argument("--type", help="message type (CloudEvents type)")
    p.add_argument("--priority", type=int, help="0 (lowest) .. 9 (most urgent)")
    p.add_argument("--delay", type=non_negative, help="deliver after this many seconds")
    p.add_argument("--ttl", type=non_negative, help="discard when not delivered within this many seconds")
    p.add_argument("--topic", action="store_true", help="DEST is a topic (publish-subscribe)")
    p.set_defaults(func=cmd_send)


def cmd_send(args: argparse.Namespace) -> int:
    import mqprimer

    url, (dest, *rest) = split_url(args.pos, ["DEST"], ["BODY"])
    headers = {}
    for n, h in enumerate(args.header, 1):
        key, sep, value = h.partition("=")
        if not sep or not key:
            # not echoed: a header value can be a token
            raise UsageError(f"--header number {n} must be KEY=VALUE (a non-empty key, then '=')")
        headers[key] = value
    opts = {"headers": headers or None, "type": args.type, "priority": args.priority, "delay": args.delay,
            "ttl": args.ttl}
    if rest and args.file:
        raise UsageError("give BODY or --file, not both")
    single: list[Any] = []
    if rest:
        single = [rest[0] if args.text else _json_or_text(rest[0])]
    elif args.file:
        with open(args.file, "rb") as f:
            data = f.read()
        single = [_file_body(data, args.text)]
    elif sys.stdin.isatty():
        raise UsageError("no body: give BODY, --file FILE, or pipe JSON lines on stdin")
    target = _dest(dest, args.topic)
    with mqprimer.connect(url) as conn:
        producer = conn.producer()
        if single:
            ids = [producer.send(target, single[0], **opts)]
        else:
            ids = _send_lines(args, producer, target, opts)
    if len(ids) == 1:
        human = f"sent {ids[0]} to {dest}"
    else:
        human = f"sent {len(ids)} messages to {dest}"
    emit(args, human, {"destination": dest, "sent": len(ids), "ids": ids})
    return EXIT_OK


def _send_lines(args: argparse.Namespace, producer: Any, target: Any, opts: dict[str, Any]) -> list[str]:
    ids: list[str] = []
    batch: list[Any] = []
    progress = progress_for(args, "sending")
    try:
        for lineno, line in enumerate(sys.stdin, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if args.text:
                body: Any = line
            else:
                try:
                    body = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"stdin line {lineno} is not JSON ({exc.msg}); use --text for text") from None
            batch.append(producer.build(target, body, **opts))
            if len(batch) >= _BATCH:
                ids += producer.send_many(batch)
                progress.update(len(batch))
                batch = []
        if batch:
            ids += producer.send_many(batch)
            progress.update(len(batch))
    finally:
        progress.close()
    return ids


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _file_body(data: bytes, text: bool) -> Any:
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    return decoded if text else _json_or_text(decoded)


# -- consume -----------------------------------------------------------------------------
def add_consume(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("consume", parents=[common], help="print messages",
                       description="Print messages as they arrive (acked unless --leave).")
    p.add_argument("pos", nargs="*", metavar="[URL] DEST")
    p.add_argument("-n", "--count", type=positive_int, help="stop after this many messages (exit 1 if fewer came)")
    p.add_argument("-t", "--timeout", type=non_negative, help="stop when no message came for this many seconds")
    p.add_argument("--leave", action="store_true", help="do not ack: the messages go back to the broker")
    p.add_argument("--topic", action="store_true", help="DEST is a topic or topic pattern")
    p.add_argument("--subscription", help="durable topic subscription name")
    p.set_defaults(func=cmd_consume)


def cmd_consume(args: argparse.Namespace) -> int:
    import mqprimer

    url, (dest,) = split_url(args.pos, ["DEST"])
    got = 0
    with mqprimer.connect(url) as conn:
        with conn.consumer(_dest(dest, args.topic), prefetch=min(args.count or 10, 100),
                           subscription=args.subscription) as consumer:
            while args.count is None or got < args.count:
                msg = consumer.receive(timeout=args.timeout)
                if msg is None:
                    break
                got += 1
                if args.json:
                    print(json.dumps(message_dict(msg.envelope), default=str, ensure_ascii=False), flush=True)
                else:
                    print(f"{msg.id} {msg.type} attempt={msg.attempt} {_body_text(msg.body)}", flush=True)
                if not args.leave:
                    msg.ack()
    if args.count is not None and got < args.count:
        sys.stderr.write(f"mqprimer consume: received {got} of {args.count} message(s) within {args.timeout:g}s\n")
        return EXIT_FAILED
    return EXIT_OK


# -- status ------------------------------------------------------------------------------
def add_status(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="where a message is (ready, reserved, done, dead...)")
    p.add_argument("pos", nargs="*", metavar="[URL] ID")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    import mqprimer

    url, (mid,) = split_url(args.pos, ["ID"])
    with mqprimer.connect(url) as conn:
        st = conn.status(mid)
    emit(args, st.value, {"id": mid, "status": st.value})
    return EXIT_OK


# -- dead-letters ------------------------------------------------------------------------
_ACTIONS = ("list", "show", "replay", "purge")


def add_dead_letters(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("dead-letters", parents=[common], help="list, show, replay or purge dead letters",
                       description="ACTION is list, show ID, replay [ID...] or purge --yes.")
    p.add_argument("pos", nargs="*", metavar="[URL] DEST ACTION [ID...]")
    p.add_argument("--limit", type=positive_int, help="at most this many (list: default 100)")
    p.add_argument("--yes", action="store_true", help="purge: really delete them")
    p.set_defaults(func=cmd_dead_letters)


def cmd_dead_letters(args: argparse.Namespace) -> int:
    import mqprimer

    pos = list(args.pos)
    idx = next((i for i, a in enumerate(pos) if a in _ACTIONS), None)
    if idx is None:
        raise UsageError(f"missing ACTION: one of {', '.join(_ACTIONS)}")
    url, (dest,) = split_url(pos[:idx], ["DEST"])
    action, ids = pos[idx], pos[idx + 1:]
    if action in ("list", "purge") and ids:
        raise UsageError(f"{action} takes no IDs")
    if action == "show" and len(ids) != 1:
        raise UsageError("show takes exactly one ID")
    if action == "purge" and not args.yes:
        raise UsageError(f"purge deletes every dead letter of {dest}; add --yes to do it")
    with mqprimer.connect(url) as conn:
        dl = conn.dead_letters(dest)
        if action == "list":
            envs = dl.list(args.limit or 100)
            if args.json:
                print(json.dumps([message_dict(e) for e in envs], default=str, ensure_ascii=False))
            else:
                for e in envs:
                    print(f"{e.id}  attempt={e.attempt}  {e.time or '-'}  {e.reason or ''}")
                print(f"{len(envs)} dead letter(s) in {dest}")
        elif action == "show":
            envs = dl.list(args.limit or 100_000)
            found = [e for e in envs if e.id == ids[0]]
            if not found:
                sys.stderr.write(f"mqprimer dead-letters: no dead letter {ids[0]} among {len(envs)} of {dest}\n")
                return EXIT_FAILED
            d = message_dict(found[0])
            if args.json:
                print(json.dumps(d, default=str, ensure_ascii=False))
            else:
                for k, v in d.items():
                    print(f"{k:>11}: {v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}")
        elif action == "replay":
            n = _replay(args, dl, set(ids) if ids else None)
            emit(args, f"replayed {n} dead letter(s) to {dest}", {"destination": dest, "replayed": n})
        else:
            n = dl.purge()
            emit(args, f"purged {n} dead letter(s) of {dest}", {"destination": dest, "purged": n})
    return EXIT_OK


def _replay(args: argparse.Namespace, dl: Any, ids: set[str] | None) -> int:
    if ids is not None:
        return int(dl.replay(args.limit, ids))
    progress = progress_for(args, "replaying", args.limit)
    total = 0
    try:
        while args.limit is None or total < args.limit:
            chunk = 500 if args.limit is None else min(500, args.limit - total)
            n = int(dl.replay(chunk))
            total += n
            progress.update(n)
            if n < chunk:
                break
    finally:
        progress.close()
    return total


# -- doctor ------------------------------------------------------------------------------
def add_doctor(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("doctor", parents=[common], help="check connectivity, credentials, a round trip, capabilities")
    p.add_argument("pos", nargs="*", metavar="[URL]")
    p.add_argument("--timeout", type=non_negative, default=10.0, help="seconds to wait for the round trip")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    import mqprimer

    from .backend import Topic
    from .errors import MQError

    url, _ = split_url(args.pos, [])
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str, started: float) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail, "ms": round((time.monotonic() - started) * 1000, 1)})

    caps: dict[str, Any] | None = None
    t = time.monotonic()
    try:
        conn = mqprimer.connect(url)
    except MQError as exc:
        check("connect", False, str(exc), t)
        conn = None
    if conn is not None:
        with conn:
            check("connect", True, f"connected and authenticated to {show_url(url)}", t)
            cap = conn.capabilities
            caps = cap.as_dict()
            t = time.monotonic()
            try:
                name = f"mqprimer.doctor.{uuid.uuid4().hex[:8]}"
                dest: Any = name if cap.queue else Topic(name)
                with conn.consumer(dest) as consumer:
                    sent = conn.producer().send(dest, {"doctor": True})
                    msg = consumer.receive(timeout=args.timeout)
                    if msg is None or msg.id != sent:
                        raise MQError(f"the message sent was not received within {args.timeout:g}s")
                    msg.ack()
                check("round trip", True, f"sent, received and acked one message on {dest}", t)
            except MQError as exc:
                check("round trip", False, str(exc), t)
            t = time.monotonic()
            try:  # what the backend can tell about the server (gearmand: version, persistence)
                for topic, text in conn.endpoints[0].call("server info", lambda b: b.server_info()).items():
                    check(topic, True, text, t)
            except MQError as exc:
                check("server info", False, str(exc), t)
    ok = all(c["ok"] for c in checks)
    if args.json:
        print(json.dumps({"url": show_url(url), "ok": ok, "checks": checks, "capabilities": caps}))
    else:
        for c in checks:
            print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['check']:<11} {c['ms']:>8.1f} ms  {c['detail']}")
        if caps is not None:
            print("capabilities:")
            for k, v in caps.items():
                print(f"  {k:<16} {v}")
    return EXIT_OK if ok else EXIT_FAILED


# -- backends ----------------------------------------------------------------------------
def add_backends(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("backends", parents=[common], help="the capability matrix of every backend")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table")
    p.set_defaults(func=cmd_backends)


def cmd_backends(args: argparse.Namespace) -> int:
    from . import matrix

    print(matrix.render("json" if args.json else "markdown" if args.markdown else "text"))
    return EXIT_OK


# -- bench -------------------------------------------------------------------------------
def add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("bench", parents=[common], help="measure send and receive throughput on a URL")
    p.add_argument("pos", nargs="*", metavar="[URL]")
    p.add_argument("-n", "--count", type=positive_int, default=10_000, help="messages (default 10000)")
    p.add_argument("--size", type=positive_int, default=200, help="body size in bytes (default 200)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import mqprimer

    url, _ = split_url(args.pos, [])
    queue = f"mqprimer.bench.{uuid.uuid4().hex[:8]}"
    body = {"pad": "x" * max(args.size - 10, 0)}
    with mqprimer.connect(url) as conn:
        producer = conn.producer()
        progress = progress_for(args, "sending", args.count)
        t = time.perf_counter()
        left = args.count
        while left:
            n = min(_BATCH, left)
            producer.send_many([producer.build(queue, body) for _ in range(n)])
            left -= n
            progress.update(n)
        send_s = time.perf_counter() - t
        progress.close()
        progress = progress_for(args, "receiving", args.count)
        t = time.perf_counter()
        got = 0
        with conn.consumer(queue, prefetch=100) as consumer:
            while got < args.count:
                msg = consumer.receive(timeout=10.0)
                if msg is None:
                    break
                msg.ack()
                got += 1
                progress.update()
        recv_s = time.perf_counter() - t
        progress.close()
    result = {"url": show_url(url), "messages": args.count, "received": got,
              "send_per_s": round(args.count / send_s), "receive_ack_per_s": round(got / recv_s)}
    emit(args, f"send {result['send_per_s']:,} msg/s, receive+ack {result['receive_ack_per_s']:,} msg/s "
               f"({args.count} messages of ~{args.size} bytes)", result)
    return EXIT_OK if got == args.count else EXIT_FAILED
