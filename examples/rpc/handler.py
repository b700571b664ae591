"""The resize service's handler: shrink the image at ``body["path"]`` and return its new size.

A :class:`mqprimer.Worker` (here ``mqprimer worker``) sends what a handler returns as the
reply to a request. A missing file is dead-lettered, so the caller gets a
:class:`mqprimer.RemoteError` with the reason at once instead of waiting for its timeout.
The request carries a path, never the image bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

import mqprimer


def resize(message: mqprimer.Message) -> dict[str, Any]:
    src = Path(message.body["path"])
    longest = int(message.body.get("max", 320))
    if not src.is_file():
        raise mqprimer.DeadLetter(f"no such image: {src}")
    dest = src.with_name(f"{src.stem}_{longest}.jpg")
    with Image.open(src) as img:
        img.thumbnail((longest, longest))
        tmp = dest.with_suffix(".part")
        img.convert("RGB").save(tmp, "JPEG", quality=85)
        width, height = img.size
    tmp.replace(dest)  # atomic: a request handled twice writes the same file, never half of one
    return {"path": str(dest), "width": width, "height": height, "worker": os.getpid()}
