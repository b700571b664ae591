"""An asyncio web service on mqprimer.aio (Starlette): enqueue jobs, answer a request/reply call."""
