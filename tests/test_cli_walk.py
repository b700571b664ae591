"""Every command of the command line, as a new user tries it: ``--help``, no arguments, one bad
value. The expected exit codes are read from docs/cli.md's table, so the docs and the code
cannot drift apart. Each case runs in-process (an exception escaping ``main`` is the
traceback a user would see); a few run as real processes too."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mqprimer
from mqprimer import cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
_ROW = re.compile(r"^\| `mqprimer( [a-z-]+)?` \| (\d+) \| (\d+)[^|]*\| `([^`]+)`[^|]*\| (\d+) \|$")


def _table() -> list[tuple[list[str], int, int, list[str], int]]:
    """(command words, --help code, no-arguments code, bad-value argv, bad-value code) per row."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = _ROW.match(line)
        if m:
            words = m.group(1).split() if m.group(1) else []
            rows.append((words, int(m.group(2)), int(m.group(3)), shlex.split(m.group(4))[1:], int(m.group(5))))
    return rows


ROWS = _table()


def test_the_table_covers_every_command() -> None:
    commands = next(a.choices for a in cli.build_parser()._actions if hasattr(a, "choices") and a.choices)
    assert sorted(r[0][0] for r in ROWS if r[0]) == sorted(commands), "docs/cli.md's table misses a command"
    assert any(not r[0] for r in ROWS), "the table has no row for mqprimer without a command"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("MQPRIMER_URL", "memory://cli-walk")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("MQPRIMER_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers  # main() sets up logging for a process; this one goes on
    root.setLevel(level)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)  # any other exception escaping here is a traceback for the user
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    out, err = capsys.readouterr()
    return code, out, err


def _check(argv: list[str], want: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(argv, capsys)
    shown = f"mqprimer {shlex.join(argv)}"
    assert "Traceback" not in out + err, f"{shown} printed a traceback:\n{err}"
    assert code == want, f"{shown} exited {code}, docs/cli.md says {want}; stderr: {err!r}"
    if code == 0:
        assert err == "", f"{shown} succeeded but wrote to stderr: {err!r}"
    else:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mqprimer"), f"{shown}: not one error line: {err!r}"
        assert len(lines[0]) > len("mqprimer x: error: ") + 10, f"{shown}: the error says nothing: {err!r}"


@pytest.mark.parametrize("row", ROWS, ids=[" ".join(r[0]) or "mqprimer" for r in ROWS])
def test_help_no_arguments_and_a_bad_value(row: tuple[list[str], int, int, list[str], int],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    words, help_code, bare_code, bad, bad_code = row
    _check([*words, "--help"], help_code, capsys)
    _check(words, bare_code, capsys)
    _check(bad, bad_code, capsys)


def test_dead_letters_actions_each_refuse_bad_use(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["dead-letters", "jobs", "show"], ["dead-letters", "jobs", "list", "x"],
                 ["dead-letters", "jobs", "replay", "--limit", "0"], ["dead-letters", "jobs", "nosuch"]):
        _check(argv, 2, capsys)


@pytest.mark.parametrize("n, argv", list(enumerate([
    ["send", "jobs", "--priority", "3", "x"],
    ["send", "jobs", "--priority", "3", "--", "x"],
    ["send", "--priority", "3", "jobs", "x"],
    ["send", "memory://cli-walk", "--priority", "3", "jobs", "-H", "k=v", "x"],
])), ids=["between", "between-then-dashdash", "before", "after-the-url"])
def test_options_anywhere_among_the_arguments(n: int, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    queue = f"walk.options.{n}"
    argv = [queue if a == "jobs" else a for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    with mqprimer.connect("memory://cli-walk") as conn, conn.consumer(queue) as c:
        m = c.receive(timeout=1)
        assert m is not None and m.body == "x", "the body went missing or the options became the body"
        m.ack()


def test_a_real_process_shows_help_and_errors_without_traceback(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "MQPRIMER_URL": "memory://x", "HOME": str(tmp_path)}
    for argv, want in ((["bridge", "--help"], 0), (["bridge"], 2), ([], 2), (["send", "q", "--priority", "x", "b"], 2)):
        r = subprocess.run([sys.executable, "-m", "mqprimer", *argv], capture_output=True, text=True, env=env,
                           timeout=60, stdin=subprocess.DEVNULL)
        assert "Traceback" not in r.stderr and r.returncode == want, (argv, r.returncode, r.stderr)
        assert len(r.stderr.splitlines()) == (0 if want == 0 else 1), (argv, r.stderr)
