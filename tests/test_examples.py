"""Every example end to end, as a user runs it from the README (real processes, real SMTP, Pillow)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def run_example(module: str, tmp_path: Path, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("MQPRIMER_URL", None)
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")  # the embedded sqlite default lands here, not in ~
    env["TMPDIR"] = str(tmp_path)
    if url is not None:
        env["MQPRIMER_URL"] = url
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=170)
    assert r.returncode == 0, f"{module} failed ({r.returncode})\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    return r


def test_demo_on_the_embedded_default(tmp_path: Path) -> None:
    r = run_example("examples.demo", tmp_path)
    assert f"sqlite:///{tmp_path}/xdg/mqprimer/default.db" in r.stdout
    assert "19/19 replies from 2 worker process(es); dead letters: 1" in r.stdout
    assert "gave up after 3 attempt(s): AttributeError" in r.stdout
    assert "workers exited with [0, 0]" in r.stdout
    assert r.stderr.count(" ack id=") >= 19  # the workers' structured log lines


def test_demo_on_a_given_url(tmp_path: Path) -> None:
    r = run_example("examples.demo", tmp_path, "--url", f"sqlite:///{tmp_path}/other.db")
    assert f"broker: sqlite:///{tmp_path}/other.db" in r.stdout
    assert not (tmp_path / "xdg").exists()


def test_notifications_retry_while_smtp_is_down_then_deliver(tmp_path: Path) -> None:
    r = run_example("examples.notifications", tmp_path, "--smtp-down-for", "1.5")
    assert "delivered 5 email(s) to 5 recipient(s); worker exit code 0" in r.stdout
    assert "invalid recipient address 'not-an-address'" in r.stdout
    assert "retry id=" in r.stderr and "unavailable (ConnectionRefusedError)" in r.stderr


def test_photos_thumbnails_by_path(tmp_path: Path) -> None:
    r = run_example("examples.photos", tmp_path, "--dir", str(tmp_path / "pics"), "--count", "6")
    assert "thumbnails: 6 in" in r.stdout
    assert len(list((tmp_path / "pics" / "thumbs").glob("*_128.jpg"))) == 6
    assert "no such image" in r.stdout and "UnidentifiedImageError" in r.stdout


def test_analytics_counts_match_a_direct_count(tmp_path: Path) -> None:
    # a log of the test's own, counted here without the example's parser: the printed totals
    # come from the workers' results database
    statuses = [200, 200, 404, 500, 301, 200, 503]
    paths = ["/", "/cart", "/api/orders", "/cart?ref=mail"]
    log = tmp_path / "access.log"
    lines = [
        f'10.0.0.{i % 250} - - [27/Nov/2026:10:00:{i % 60:02d} +0000] "GET {paths[i % 4]} HTTP/1.1" '
        f'{statuses[i % 7]} {100 + i} "-" "curl/8"'
        for i in range(210)
    ]
    log.write_text("\n".join([*lines[:100], "not a log line", *lines[100:], "GET / HTTP/1.1 200"]) + "\n")
    by_status = Counter(str(statuses[i % 7]) for i in range(210))
    by_path = Counter(paths[i % 4].split("?")[0] for i in range(210))
    r = run_example("examples.analytics", tmp_path, "--log", str(log), url=f"sqlite:///{tmp_path}/env.db")
    printed = {kind: dict(pair.rsplit(" ", 1) for pair in text.split(", "))
               for kind, text in re.findall(r"^  per (status|path): (.*)$", r.stdout, re.MULTILINE)}
    assert {k: int(n) for k, n in printed["status"].items()} == by_status
    assert {k: int(n) for k, n in printed["path"].items()} == by_path
    assert "counted 210 requests" in r.stdout and "dead letters: 2" in r.stdout


def test_integrations_outbox_bridged_to_the_target(tmp_path: Path) -> None:
    r = run_example("examples.integrations", tmp_path, "--orders", "8")
    assert "forwarded 8 message(s)" in r.stdout
    assert "central: received 8 orders; outbox now empty" in r.stdout


def test_high_availability_failover_and_consume_from_both(tmp_path: Path) -> None:
    r = run_example("examples.ha", tmp_path, "--events", "12")  # exit code 0: every event handled once
    assert "handled 12/12 events from both brokers; exit code 0" in r.stdout
    # the producer's own log line, written only when a send really failed over from broker A
    assert re.search(r"failing over from sqlite:///\S*/broker-a\.db\S*: ", r.stderr), r.stderr[-2000:]


def test_scripts_demo_is_the_readme_command(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"))
    env.pop("MQPRIMER_URL", None)
    r = subprocess.run([str(ROOT / "scripts" / "demo")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=170)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "19/19 replies" in r.stdout and (tmp_path / "xdg" / "mqprimer" / "default.db").exists()


@pytest.mark.parametrize("broker", ["amqp", "beanstalk", "stomp-rabbitmq"])
def test_demo_on_a_real_broker(tmp_path: Path, broker: str) -> None:
    from conftest import need_broker

    url = need_broker(broker)
    r = run_example("examples.demo", tmp_path, "--url", url)
    assert "19/19 replies from 2 worker process(es); dead letters: 1" in r.stdout
    password = mqprimer_password(url)
    assert password is None or (password not in r.stdout and password not in r.stderr)


def mqprimer_password(url: str) -> str | None:
    from mqprimer import URL

    return URL.parse(url).password
