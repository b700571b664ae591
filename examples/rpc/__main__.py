"""A synchronous service: ``python -m examples.rpc [--url URL] [--count N] [--dir DIR]``.

Starts two ``mqprimer worker`` processes serving the ``resize`` handler, then calls them
from this script with ``conn.request()``: "resize this image and return its new size".
Each call waits for its reply; a request for a missing file comes back as a
``RemoteError`` with the service's reason. Works on the embedded sqlite default and on
any URL whose backend does request/reply (see docs/request-reply.md).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from PIL import Image

import mqprimer
from examples._run import parser, resolve_url, run_id, say, start_workers, stop_workers, url_list


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=4, help="images to resize (default 4)")
    p.add_argument("--dir", type=Path, help="where to put the images (default: a temporary folder)")
    args = p.parse_args()
    url = resolve_url(args.url)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="mqprimer-rpc-"))
    folder.mkdir(parents=True, exist_ok=True)
    queue = f"resize.{run_id()}"
    images = []
    for i in range(args.count):
        path = folder / f"image-{i}.png"
        Image.new("RGB", (1280 + 160 * i, 960), (30 * i % 256, 90, 160)).save(path)
        images.append(path)
    workers = start_workers(2, url, queue, "examples.rpc.handler:resize", "--max-attempts", "1", quiet=True)
    try:
        with mqprimer.connect(url_list(url)) as conn:
            served = set()  # the workers that answered
            for path in images:
                start = time.perf_counter()
                # the first call waits for the workers to start: a generous timeout
                reply = conn.request(queue, {"path": str(path), "max": 320}, timeout=60)
                ms = (time.perf_counter() - start) * 1000
                served.add(reply.body["worker"])
                say(f"resized {path.name} to {reply.body['width']}x{reply.body['height']} in {ms:.0f} ms")
            try:
                conn.request(queue, {"path": str(folder / "missing.png")}, timeout=30)
            except mqprimer.RemoteError as exc:
                say(f"missing.png: the service failed the request: {exc.reason}")
            else:
                raise SystemExit("a request for a missing file got a normal reply")
            # a worker stopped before it is up dies of the signal instead of draining (exit
            # -15): call again until each worker has answered once, so both stop cleanly
            deadline = time.monotonic() + 30
            while images and len(served) < len(workers) and time.monotonic() < deadline:
                served.add(conn.request(queue, {"path": str(images[0]), "max": 320}, timeout=60).body["worker"])
    finally:
        codes = stop_workers(workers)
    say(f"workers stopped with exit codes {codes}")
    return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
