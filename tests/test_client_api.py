"""The async Python client (duplex.client.client) against a live tiny server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from server_harness import FRAME, free_port, live_server, load_tiny_models, synth_audio

from duplex.client.client import AudioEvent, DuplexClient, MetadataEvent, ServerError, TextEvent, chat_url


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


def test_chat_url_appends_params():
    assert chat_url("ws://h:1/api/chat", None) == "ws://h:1/api/chat"
    assert chat_url("ws://h:1/api/chat", {"text_seed": 3, "audio_topk": 5}) == \
        "ws://h:1/api/chat?text_seed=3&audio_topk=5"
    assert chat_url("ws://h:1/api/chat?a=1", {"b": 2}) == "ws://h:1/api/chat?a=1&b=2"


def test_connect_to_nothing_raises_server_error():
    async def main():
        with pytest.raises(ServerError, match="cannot connect"):
            await DuplexClient.connect(f"ws://127.0.0.1:{free_port()}/api/chat", timeout=10)

    asyncio.run(main())


def test_events_send_pcm_and_close(models):
    with live_server(models, max_sessions=1, max_queue=0, torch_threads=1) as server:
        async def main():
            async with await DuplexClient.connect(server.url, params={"text_seed": 4}, timeout=10) as client:
                assert (client.protocol_version, client.model_version) == (0, 0)
                with pytest.raises(ServerError, match="server busy"):
                    await DuplexClient.connect(server.url, timeout=10)
                audio = synth_audio(8, 9)
                assert await client.send_pcm(audio[:1000]) == 0  # less than a frame: kept
                assert await client.send_pcm(audio[1000:3 * FRAME]) == 3
                assert await client.send_pcm(audio[3 * FRAME:]) == 5
                kinds: dict[type, int] = {}
                async for event in client:
                    kinds[type(event)] = kinds.get(type(event), 0) + 1
                    if isinstance(event, AudioEvent):
                        assert event.pcm.dtype == np.float32 and event.pcm.size == FRAME
                    if kinds.get(AudioEvent, 0) == 6:
                        break
                assert kinds.get(TextEvent, 0) >= 1 and kinds.get(MetadataEvent, 0) >= 1
                assert client.session_metadata["params"] == {"text_seed": 4}
            leftovers = [event async for event in client]  # what arrived before the close, then the end
            assert all(isinstance(e, (AudioEvent, TextEvent)) for e in leftovers)
            assert await client.next_event(timeout=5) is None

        asyncio.run(main())
