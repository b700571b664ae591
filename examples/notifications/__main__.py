"""Notifications: ``python -m examples.notifications [--url URL] [--count N] [--smtp-down-for S]``.

Starts a real SMTP server on 127.0.0.1 (aiosmtpd) *after* ``--smtp-down-for`` seconds, and
not before the worker has found it down (the handler says so by touching a file), so the
worker retries however slow the machine; then every email arrives. One email has an
invalid address and ends in the dead-letter queue.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from typing import Any

from aiosmtpd.controller import Controller

import mqprimer
from examples._run import parser, resolve_url, run_id, say, start_worker, stop_workers, url_list, wait_for


class Inbox:
    """aiosmtpd handler that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        with self.lock:
            self.messages.append(envelope)
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=5, help="emails to send (default 5)")
    p.add_argument("--smtp-down-for", type=float, default=2.0, help="seconds before the SMTP server starts")
    args = p.parse_args()
    url = resolve_url(args.url)
    queue = f"notifications.{run_id()}"
    port = free_port()
    inbox = Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=port)
    with mqprimer.connect(url_list(url)) as conn:
        producer = conn.producer()
        for i in range(args.count):
            producer.send(queue, {"to": f"user{i}@example.org", "subject": f"Welcome #{i}", "text": "Hello!"},
                          type="email.send")
        producer.send(queue, {"to": "not-an-address", "subject": "?", "text": "?"}, type="email.send")
        say(f"producer: queued {args.count} emails and 1 with an invalid address on {queue}")
        say(f"smtp:     down for {args.smtp_down_for:g}s (port {port}): the worker will retry")
        mark = os.path.join(tempfile.mkdtemp(prefix="mq-notify-"), "smtp-was-down")
        worker = start_worker(url, queue, "examples.notifications.handler:send_email",
                              env={"SMTP_PORT": str(port), "SMTP_RETRY_DELAY": "0.5", "SMTP_DOWN_MARK": mark})
        try:
            time.sleep(args.smtp_down_for)
            if args.smtp_down_for > 0:
                wait_for(lambda: os.path.exists(mark), 60, "the worker to find the SMTP server down", [worker])
            smtp.start()
            say(f"smtp:     up on 127.0.0.1:{port}")
            wait_for(lambda: len(inbox.messages) >= args.count, 60, "every email at the SMTP server", [worker])
            dead = conn.dead_letters(queue).list(10)
        finally:
            codes = stop_workers([worker])
            smtp.stop()
    recipients = sorted({rcpt for e in inbox.messages for rcpt in e.rcpt_tos})
    say(f"delivered {len(inbox.messages)} email(s) to {len(recipients)} recipient(s); worker exit code {codes[0]}")
    for d in dead:
        say(f"dead:     {d.reason}")
    ok = len(recipients) == args.count and len(dead) == 1 and codes == [0]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
