"""What the examples share: the URL option, worker processes, waiting with a deadline."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import mqprimer

ROOT = Path(__file__).resolve().parent.parent


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", default=None, help="broker URL (comma-separated for several); "
                   "default $MQPRIMER_URL, else the embedded sqlite file")
    return p


def resolve_url(url: str | None) -> str:
    """The URL to use; memory:// is refused because the workers are separate processes."""
    url = url or mqprimer.default_url()
    if url.startswith("memory:"):
        sys.exit("memory:// lives inside one process, and these examples run workers as separate processes: "
                 "use sqlite:///file.db or a broker URL")
    return url


def run_id() -> str:
    """A suffix for queue names, so that runs sharing a database never see each other's messages."""
    return uuid.uuid4().hex[:6]


def url_list(url: str) -> list[str]:
    parts = [p for p in url.split(",") if p]
    return parts if all("://" in p for p in parts) else [url]


def start_worker(url: str, dest: str, handler: str, *options: str, env: dict[str, str] | None = None,
                 quiet: bool = False) -> subprocess.Popen[bytes]:
    """``mqprimer worker URL DEST HANDLER OPTIONS...`` as a child process (logs go to our stderr)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    e["MQPRIMER_URL"] = url
    e.update(env or {})
    cmd = [sys.executable, "-m", "mqprimer.cli", "worker", url, dest, handler, *options]
    if quiet:
        cmd.append("--quiet")
    return subprocess.Popen(cmd, cwd=ROOT, env=e)


def stop_workers(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> list[int]:
    """SIGTERM (the worker drains and exits 0), then wait; kill what is still alive at the deadline."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def wait_for(cond: Callable[[], object], timeout: float, what: str, procs: list[subprocess.Popen[bytes]] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while not cond():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise SystemExit(f"a worker exited early (code {dead[0].returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def say(text: str) -> None:
    print(text, flush=True)


def start_workers(n: int, url: str, dest: str, handler: str, *options: str, env: dict[str, str] | None = None,
                  quiet: bool = False) -> list[subprocess.Popen[bytes]]:
    return [start_worker(url, dest, handler, *options, env=env, quiet=quiet) for _ in range(n)]
