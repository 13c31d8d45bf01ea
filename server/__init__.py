"""The real-time websocket server."""
