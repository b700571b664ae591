"""Notifications: a producer queues emails; a worker sends them through a local SMTP server."""
