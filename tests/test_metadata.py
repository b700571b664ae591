"""Package metadata states what works at this commit: every extra installs a client library
some available backend uses, and the summary names the backends that exist and no others.

Read from the installed distribution's metadata (what pip and PyPI show; scripts/test
reinstalls the package on every run), not from pyproject.toml's text.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import metadata

from mqprimer import registry


def _available(spec: registry.BackendSpec) -> bool:
    return importlib.util.find_spec(spec.target.partition(":")[0]) is not None


def test_every_extra_serves_an_available_backend_and_all_covers_them() -> None:
    meta = metadata("mqprimer")
    extras = set(meta.get_all("Provides-Extra") or [])
    served = {s.extra for s in registry.BUILTIN.values() if s.extra and _available(s)}
    assert extras - {"all", "dev"} == served, "an extra installs a library no available backend uses, or one is missing"
    in_all = {x.strip() for r in meta.get_all("Requires-Dist") or [] if 'extra == "all"' in r
              for x in r.split(";")[0].strip().removeprefix("mqprimer[").removesuffix("]").split(",")}
    assert in_all == served, f"the all extra installs {sorted(in_all)}, not every backend extra {sorted(served)}"


def test_summary_names_every_available_backend_and_no_other() -> None:
    summary = (metadata("mqprimer")["Summary"] or "").lower()
    # the word a reader looks for, by extra (or by scheme for the stdlib backends)
    words = {"amqp": "amqp", "stomp": "stomp", "beanstalk": "beanstalkd", "gearman": "gearman", "xmpp": "xmpp",
             "zmq": "zeromq", "sqlite": "sqlite", "memory": "memory"}
    for spec in registry.BUILTIN.values():
        word = words[spec.extra or spec.scheme]
        assert (word in summary) == _available(spec), f"the summary and the {spec.scheme}:// backend disagree"
