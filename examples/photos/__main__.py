"""Photo thumbnails: ``python -m examples.photos [--url URL] [--count N] [--dir DIR]``.

Generates N pictures with Pillow, queues one message per picture with its *path*, and
runs two worker processes that write ``thumbs/<name>_128.jpg`` next to them. A missing
file and a file that is not an image end in the dead-letter queue with their reasons.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

import mqprimer
from examples._run import parser, resolve_url, run_id, say, start_workers, stop_workers, url_list, wait_for


def make_pictures(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        img = Image.new("RGB", (640 + 16 * i, 480), (40 * i % 256, 120, 200 - 10 * i % 200))
        for x in range(0, img.width, 40):  # a few stripes, so the thumbnail has something to shrink
            for y in range(img.height):
                img.putpixel((x, y), (255, 255, 255))
        path = folder / f"photo-{i:02d}.png"
        img.save(path)
        paths.append(path)
    return paths


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=8, help="pictures (default 8)")
    p.add_argument("--dir", type=Path, help="where to put pictures and thumbnails (default: a temporary folder)")
    args = p.parse_args()
    url = resolve_url(args.url)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="mqprimer-photos-"))
    folder.mkdir(parents=True, exist_ok=True)
    queue = f"thumbnails.{run_id()}"
    pictures = make_pictures(folder, args.count)
    (folder / "not-an-image.png").write_bytes(b"this is text, not a PNG")
    with mqprimer.connect(url_list(url)) as conn:
        producer = conn.producer()
        for path in [*pictures, folder / "not-an-image.png", folder / "missing.png"]:
            producer.send(queue, {"path": str(path), "size": 128}, type="photo.uploaded")
        say(f"producer: queued {len(pictures) + 2} paths on {queue} (one missing file, one that is not an image)")
        workers = start_workers(2, url, queue, "examples.photos.handler:make_thumbnail",
                                "--prefetch", "1", "--max-attempts", "2", "--retry-delay", "0.2")
        thumbs = [folder / "thumbs" / f"{p.stem}_128.jpg" for p in pictures]
        dead_letters = conn.dead_letters(queue)
        try:
            wait_for(lambda: all(t.exists() for t in thumbs), 90, "every thumbnail", workers)
            wait_for(lambda: len(dead_letters.list(10)) == 2, 60, "two dead letters", workers)
            dead = dead_letters.list(10)
        finally:
            codes = stop_workers(workers)
    sizes = []
    for t in thumbs:
        with Image.open(t) as img:
            sizes.append(img.size)
    say(f"thumbnails: {len(thumbs)} in {folder / 'thumbs'}, largest {max(sizes)}")
    for d in dead:
        say(f"dead:       {d.reason}")
    say(f"workers exited with {codes}")
    ok = all(max(s) <= 128 for s in sizes) and len(dead) == 2 and codes == [0, 0]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
