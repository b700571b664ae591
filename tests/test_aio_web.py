"""examples/aio_web as a real process (uvicorn on 127.0.0.1), driven over HTTP with httpx."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import starlette  # noqa: F401  (the dev extra the example's server runs on: missing, the run fails)
import uvicorn  # noqa: F401

from conftest import ROOT
from mqprimer.testing.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("kind", ["sqlite-default", "memory"])
def test_web_service_enqueues_jobs_and_answers_requests(kind: str, tmp_path: Path) -> None:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path))  # the sqlite default lands under it
    env.pop("MQPRIMER_URL", None)
    port = free_port()
    args = ["--url", "memory://aio-web"] if kind == "memory" else []
    proc = subprocess.Popen([sys.executable, "-m", "examples.aio_web", "--port", str(port), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (proc.stdout.read() if proc.stdout else b"").decode()[-2000:]
        try:
            return bool(httpx.get(f"{base}/stats").status_code == 200)
        except httpx.TransportError:
            return False

    try:
        wait_until(up, timeout=30, interval=0.1, what="the web service to listen")
        with httpx.Client(base_url=base, timeout=15) as client:
            ids = [client.post("/jobs", json={"path": f"{i}.jpg"}).json()["id"] for i in range(5)]
            assert len(set(ids)) == 5
            r = client.post("/resize", json={"width": 4000, "height": 3000, "max": 640})
            assert r.status_code == 200 and r.json() == {"width": 640, "height": 480}
            bad = client.post("/resize", json={"width": "big"})
            assert bad.status_code == 422 and "integers" in bad.json()["error"]
            wait_until(lambda: client.get("/stats").json()["jobs_done"] == 5, what="the 5 jobs to be handled")
            where = client.get(f"/jobs/{ids[0]}")
            assert where.status_code == 200 and where.json()["status"] in ("done", "unknown"), where.text
    finally:
        proc.terminate()
        proc.wait(20)
    if kind == "sqlite-default":
        assert (tmp_path / "mqprimer" / "default.db").exists(), "not the embedded sqlite default"
