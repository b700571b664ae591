"""``python -m examples.aio_web [--url URL] [--port 8000]``: serve the example with uvicorn on 127.0.0.1.

Then: ``curl -X POST 127.0.0.1:8000/jobs -d '{"path": "a.jpg"}'`` and
``curl -X POST 127.0.0.1:8000/resize -d '{"width": 4000, "height": 3000, "max": 640}'``.
"""

from __future__ import annotations

import argparse

import uvicorn

from .app import make_app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", help="broker URL (default: $MQPRIMER_URL, else the embedded sqlite file)")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    uvicorn.run(make_app(args.url), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
