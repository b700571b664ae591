"""An example job for the supervised workers: optionally sleep ``body["sleep"]`` seconds.

With ``HANDLED_DIR`` set, it leaves ``<id>.started`` and ``<id>`` files there, which is how
the supervisord tests see which messages were handled.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import mqprimer


def handle(message: mqprimer.Message) -> None:
    body = message.body
    seconds = float(body.get("sleep", 0)) if isinstance(body, dict) else 0.0
    out = os.environ.get("HANDLED_DIR")
    if out:
        (Path(out) / f"{message.id}.started").touch()
    time.sleep(seconds)
    if out:
        (Path(out) / message.id).touch()
