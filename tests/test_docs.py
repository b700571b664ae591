"""Docs generated from code stay in step with it."""

from __future__ import annotations

import importlib.util
from importlib.machinery import SourceFileLoader
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_capability_matrix_in_docs_is_current() -> None:
    loader = SourceFileLoader("update_docs", str(ROOT / "scripts" / "update-docs"))
    spec = importlib.util.spec_from_loader("update_docs", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    assert module.block() in (ROOT / "docs" / "backends.md").read_text(), (
        "docs/backends.md has a stale capability matrix: run scripts/update-docs and commit the result"
    )


def test_reliability_figures_list_every_backend_and_fault() -> None:
    """docs/reliability.md (scripts/update-reliability) has every battery backend of this run and
    a row, measured or N/A with its reason, for each fault. Numbers vary run to run: not compared."""
    from conftest import _is_tls_twin, broker_urls
    from mqprimer.testing.battery import FAULTS

    doc = ROOT / "docs" / "reliability.md"
    assert doc.exists(), "docs/reliability.md is missing: run the battery, then scripts/update-reliability"
    sections = {s.split("\n", 1)[0].strip(): s for s in doc.read_text().split("\n## ")[1:]}
    expected = {"memory", "sqlite", "zeromq", "zeromq-ack"}
    expected |= {name for name, url in broker_urls().items() if not _is_tls_twin(name, url)}
    missing = sorted(expected - set(sections))
    assert not missing, f"docs/reliability.md has no figures for {missing}: run the battery, scripts/update-reliability"
    for backend in sorted(expected):
        for fault in FAULTS:
            rows = [line for line in sections[backend].splitlines() if line.startswith(f"| {fault} |")]
            assert len(rows) == 1, f"docs/reliability.md: {backend} has no row for {fault!r}"
            assert "not run" not in rows[0], f"docs/reliability.md: {fault!r} was not run on {backend}"
