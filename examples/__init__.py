"""Runnable examples: ``python -m examples.demo``, ``python -m examples.notifications``, ...

Each one runs on ``$MQPRIMER_URL`` (or ``--url``), else on the embedded sqlite default.
See examples/README.md.
"""
