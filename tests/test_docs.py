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
