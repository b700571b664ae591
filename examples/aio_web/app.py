"""The service: ``POST /jobs`` enqueues a job, ``POST /resize`` is a request/reply call to a
service on the queue, ``GET /jobs/{id}`` asks the broker where a job is, ``GET /stats`` shows
what the in-process workers did. Two :class:`mqprimer.aio.Worker` run beside the app on its own
event loop (started and stopped by the lifespan); in production they would be
``mqprimer worker URL QUEUE examples.aio_web.app:resize`` processes on any machine.

Any URL works (``MQPRIMER_URL`` or the embedded sqlite default when none is given).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import mqprimer
import mqprimer.aio as aio


async def resize(message: aio.Message) -> dict[str, int]:
    """The request/reply service: a reply is what the handler returns."""
    body = message.body
    if not isinstance(body, dict) or not all(isinstance(body.get(k), int) for k in ("width", "height", "max")):
        raise mqprimer.DeadLetter("want {width, height, max} as integers")  # the caller gets RemoteError
    scale = min(1.0, body["max"] / max(body["width"], body["height"]))
    await asyncio.sleep(0)  # real work would await an image library on a thread
    return {"width": round(body["width"] * scale), "height": round(body["height"] * scale)}


def make_app(url: str | None = None, suffix: str | None = None) -> Starlette:
    """The Starlette app on ``url`` (default: ``MQPRIMER_URL``, else the sqlite default)."""
    url = url or mqprimer.default_url()
    suffix = suffix or uuid.uuid4().hex[:8]
    jobs_queue, rpc_queue = f"web-jobs-{suffix}", f"web-resize-{suffix}"
    done: list[str] = []

    async def handle_job(message: aio.Message) -> None:
        done.append(message.id)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        workers = [aio.Worker(url, rpc_queue, resize, concurrency=4, idle_max=0.2, handle_signals=False),
                   aio.Worker(url, jobs_queue, handle_job, concurrency=4, idle_max=0.2, handle_signals=False)]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        async with aio.connect(url) as conn:
            app.state.conn = conn
            app.state.producer = conn.producer()
            try:
                yield
            finally:
                for w in workers:
                    w.stop()  # drain: in-flight messages are settled, the rest stay on the broker
                await asyncio.gather(*tasks)

    async def enqueue(request: Request) -> JSONResponse:
        job: Any = await request.json()
        mid = await request.app.state.producer.send(jobs_queue, job, type="web.job")
        return JSONResponse({"id": mid}, status_code=202)

    async def status(request: Request) -> JSONResponse:
        conn: aio.Connection = request.app.state.conn
        if not conn.capabilities.status:
            return JSONResponse({"error": f"{conn.capabilities.name} keeps no message status"}, status_code=501)
        where = await conn.status(request.path_params["id"])
        return JSONResponse({"id": request.path_params["id"], "status": where.value})

    async def call_resize(request: Request) -> JSONResponse:
        conn: aio.Connection = request.app.state.conn
        try:
            reply = await conn.request(rpc_queue, await request.json(), timeout=10)
        except mqprimer.RemoteError as exc:
            return JSONResponse({"error": exc.reason}, status_code=422)
        except mqprimer.Timeout:
            return JSONResponse({"error": "no resize service answered in time"}, status_code=504)
        return JSONResponse(reply.body)

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"jobs_done": len(done), "url": str(mqprimer.URL.parse(url))})

    return Starlette(routes=[
        Route("/jobs", enqueue, methods=["POST"]), Route("/jobs/{id}", status), Route("/resize", call_resize,
                                                                                      methods=["POST"]),
        Route("/stats", stats),
    ], lifespan=lifespan)
