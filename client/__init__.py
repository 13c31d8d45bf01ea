"""Clients: the web UI (static files in web/), the async Python client and the CLI."""
