"""The worker's handler: make a thumbnail of the image at ``body["path"]``.

The message carries a path, never the image bytes (the talk insists: brokers are for
small messages). A missing file is permanent (``DeadLetter``); a file Pillow cannot read
fails, is retried by the policy, then dead-lettered with the error.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

import mqprimer


def make_thumbnail(message: mqprimer.Message) -> None:
    src = Path(message.body["path"])
    size = int(message.body.get("size", 128))
    if not src.is_file():
        raise mqprimer.DeadLetter(f"no such image: {src}")
    out_dir = src.parent / "thumbs"
    out_dir.mkdir(exist_ok=True)
    dest = out_dir / f"{src.stem}_{size}.jpg"
    with Image.open(src) as img:
        img.thumbnail((size, size))
        tmp = dest.with_suffix(".part")
        img.convert("RGB").save(tmp, "JPEG", quality=85)
    tmp.replace(dest)  # atomic: a redelivered message rewrites the same thumbnail, never half of one
