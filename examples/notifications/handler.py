"""The worker's handler: send one email through SMTP (``SMTP_HOST``/``SMTP_PORT``).

An SMTP server that is down is temporary: ``Retry`` after a short delay, without
blocking other messages. A recipient the server refuses is permanent: ``DeadLetter``.
"""

from __future__ import annotations

import os
import smtplib
from email.message import EmailMessage

import mqprimer


def send_email(message: mqprimer.Message) -> None:
    mail = message.body
    if "@" not in mail.get("to", ""):
        raise mqprimer.DeadLetter(f"invalid recipient address {mail.get('to')!r}")
    msg = EmailMessage()
    msg["From"] = "noreply@example.org"
    msg["To"] = mail["to"]
    msg["Subject"] = mail["subject"]
    msg["Message-ID"] = f"<{message.id}@mqprimer.example>"  # lets the receiver drop a duplicate delivery
    msg.set_content(mail["text"])
    host, port = os.environ.get("SMTP_HOST", "127.0.0.1"), int(os.environ.get("SMTP_PORT", "8025"))
    try:
        with smtplib.SMTP(host, port, timeout=10) as smtp:
            smtp.send_message(msg)
    except (ConnectionRefusedError, smtplib.SMTPServerDisconnected, TimeoutError) as exc:
        if os.environ.get("SMTP_DOWN_MARK"):  # tells the example's driver a retry really happened
            open(os.environ["SMTP_DOWN_MARK"], "a").close()
        raise mqprimer.Retry(delay=float(os.environ.get("SMTP_RETRY_DELAY", "1")),
                             reason=f"SMTP server {host}:{port} unavailable ({type(exc).__name__})") from exc
    except smtplib.SMTPRecipientsRefused as exc:
        raise mqprimer.DeadLetter(f"recipient refused: {mail['to']}") from exc
