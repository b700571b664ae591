"""Integrations: save locally first (a sqlite outbox), push second (``mqprimer bridge``)."""
