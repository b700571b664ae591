"""The supervisord configuration's example handler (see supervisord.conf)."""
