"""Built-in backends, one module per protocol. See :mod:`mqprimer.backend` for the rules."""
