"""The capability matrix, generated from the backends' :class:`Capabilities` records.

``mqprimer backends`` prints it; ``mqprimer backends --markdown`` writes the table that
docs/backends.md includes (a test fails when the committed copy is stale). A backend
module may expose ``CAPABILITY_ROWS`` (one record per broker flavour, e.g. STOMP on
RabbitMQ and on ActiveMQ); otherwise its class's ``capabilities`` is its row.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

from . import registry
from .backend import FEATURES, Capabilities, Support
from .errors import BackendNotInstalled

_MARK = {Support.NATIVE: "native", Support.EMULATED: "emulated", Support.UNSUPPORTED: "—"}
_HEAD = ["backend", "schemes", *FEATURES, "confirmed send", "persistent", "guarantee", "max size"]


@dataclass(frozen=True)
class Row:
    schemes: tuple[str, ...]
    caps: Capabilities


def rows() -> tuple[list[Row], list[str]]:
    """Rows for every available built-in and entry-point backend, and notes on missing ones."""
    by_target: dict[str, list[str]] = {}
    for scheme in registry.schemes():
        spec = registry.BUILTIN.get(scheme)
        by_target.setdefault(spec.target if spec else f"ep:{scheme}", []).append(scheme)
    out: list[Row] = []
    missing: list[str] = []
    for schemes in by_target.values():
        try:
            cls = registry.get(schemes[0])
        except BackendNotInstalled as exc:
            missing.append(f"{'/'.join(schemes)}: {exc}")
            continue
        module = importlib.import_module(cls.__module__)
        records = getattr(module, "CAPABILITY_ROWS", None) or [cls.capabilities]
        out.extend(Row(tuple(f"{s}://" for s in schemes), c) for c in records)
    return out, missing


def _cells(r: Row) -> list[str]:
    c = r.caps
    size = f"{c.max_message_size:,} B" if c.max_message_size else "—"
    marks = [_MARK[getattr(c, f)] for f in FEATURES]
    if c.priority and c.priority_levels != 10:  # fewer distinct levels than mqprimer's 0..9
        marks[FEATURES.index("priority")] += f" ({c.priority_levels} levels)"
    return [
        c.name, " ".join(r.schemes), *marks,
        "yes" if c.confirmed_send else "no", "yes" if c.persistent else "no", c.guarantee, size,
    ]


def render(fmt: str = "text") -> str:
    """The matrix as ``text`` (aligned columns), ``markdown`` or ``json``."""
    table, missing = rows()
    if fmt == "json":
        return json.dumps(
            [{"schemes": list(r.schemes), **r.caps.as_dict()} for r in table] + [{"unavailable": m} for m in missing],
            indent=2, ensure_ascii=False,
        )
    cells = [_cells(r) for r in table]
    if fmt == "markdown":
        lines = ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        lines.append("")
        lines.append("native: the broker does it; emulated: mqprimer does it on top of the broker; —: refused "
                     "with `UnsupportedError`.")
        lines += [f"\nNot available in this version: {m.split(':', 1)[0]}." for m in missing]
        return "\n".join(lines) + "\n"
    if fmt != "text":
        raise ValueError(f"unknown format {fmt!r}: use text, markdown or json")
    head = [h.replace("_", " ") for h in _HEAD]
    widths = [max(len(x) for x in col) for col in zip(head, *cells, strict=True)]
    fmt_line = "  ".join(f"{{:{w}}}" for w in widths)
    out = [fmt_line.format(*head), fmt_line.format(*("-" * w for w in widths))]
    out += [fmt_line.format(*c) for c in cells]
    out += [f"not available: {m}" for m in missing]
    return "\n".join(out) + "\n"
