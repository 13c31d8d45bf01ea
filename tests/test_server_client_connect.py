"""DuplexClient.connect with wss:// URLs and ssl contexts (no server needed)."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from server_harness import free_port

from duplex.client.client import DuplexClient, ServerError


def test_wss_url_without_ssl_context_gives_the_connection_error():
    async def main():
        with pytest.raises(ServerError, match="cannot connect to wss://"):
            await DuplexClient.connect(f"wss://127.0.0.1:{free_port()}/api/chat", timeout=10)

    asyncio.run(main())


def test_wss_url_with_ssl_context_gives_the_connection_error():
    async def main():
        with pytest.raises(ServerError, match="cannot connect to wss://"):
            await DuplexClient.connect(f"wss://127.0.0.1:{free_port()}/api/chat", timeout=10,
                                       ssl=ssl.create_default_context())

    asyncio.run(main())


def test_ssl_context_with_a_ws_url_is_refused_clearly():
    async def main():
        with pytest.raises(ValueError, match="not a wss:// URL"):
            await DuplexClient.connect(f"ws://127.0.0.1:{free_port()}/api/chat", timeout=10,
                                       ssl=ssl.create_default_context())

    asyncio.run(main())
