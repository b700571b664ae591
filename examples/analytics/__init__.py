"""Analytics: web-server log lines aggregated by workers into counts per status code and path."""
