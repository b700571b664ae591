"""The pipeline worker's handler: do the task's work, then push the result to the sink.

The sink's URL comes from ``PIPELINE_SINK`` (set by ``python -m examples.pipeline``). Its
PULL socket binds and every worker's PUSH connects to it: many workers, one sink.
"""

from __future__ import annotations

import os
import time
from typing import Any

import mqprimer

_sink: Any = None


def work(message: mqprimer.Message) -> None:
    global _sink
    time.sleep(message.body["ms"] / 1000)  # the task's "work"
    if _sink is None:
        _sink = mqprimer.connect(os.environ["PIPELINE_SINK"]).producer()
    _sink.send("results", {"task": message.body["task"], "worker": os.getpid()})
