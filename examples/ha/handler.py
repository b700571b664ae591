"""The worker's handler: record each event as a file named by its id in ``HA_OUT``."""

from __future__ import annotations

import os
from pathlib import Path

import mqprimer


def record(message: mqprimer.Message) -> None:
    (Path(os.environ["HA_OUT"]) / message.id).write_text(str(message.body["n"]))
