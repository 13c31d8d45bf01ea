"""Streaming a WAV file to a duplex server and collecting the model's answer (``duplex talk --input``).

The file is sent in 80 ms frames, in real time (one frame every 80 ms on an absolute clock, as a
microphone would) or as fast as the server takes them (``fast``). Meanwhile every event is
collected: model audio, text pieces (printed live through ``on_text``), metadata and errors.
After the last frame, the conversation ends once the server has been quiet for ``drain_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from duplex.client.audio import FRAME_SIZE, SAMPLE_RATE, frames
from duplex.client.client import AudioEvent, DuplexClient, ErrorEvent, MetadataEvent, ServerError, TextEvent

logger = logging.getLogger(__name__)

FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE


@dataclass
class Conversation:
    """What came back from the server during one file session."""

    audio: list[np.ndarray] = field(default_factory=list)  # model PCM chunks, float32 24 kHz
    pieces: list[str] = field(default_factory=list)  # text pieces, spaces included
    metadata: list[dict] = field(default_factory=list)
    error: str | None = None  # a kind-5 message received mid-session
    frames_sent: int = 0
    last_event: float = field(default_factory=time.monotonic)

    @property
    def pcm(self) -> np.ndarray:
        """All model audio received, ``[T]`` float32."""
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)

    @property
    def transcript(self) -> str:
        return "".join(self.pieces).strip()


async def stream_file(
    client: DuplexClient,
    pcm: np.ndarray,
    fast: bool = False,
    drain_seconds: float = 1.0,
    on_text: Callable[[str], None] | None = None,
) -> Conversation:
    """Send ``pcm`` (mono float32 at 24 kHz) frame by frame and collect the answer until quiet."""
    conversation = Conversation()
    receiver = asyncio.ensure_future(_collect(client, conversation, on_text))
    try:
        await _send_frames(client, pcm, fast, conversation, receiver)
        await _wait_until_quiet(conversation, receiver, drain_seconds)
    finally:
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
    return conversation


async def _send_frames(client: DuplexClient, pcm: np.ndarray, fast: bool, conversation: Conversation,
                       receiver: asyncio.Future) -> None:
    """One frame per 80 ms on an absolute schedule (no drift), or back to back when ``fast``."""
    start = time.monotonic()
    for index, frame in enumerate(frames(pcm)):
        if receiver.done():  # the server closed or sent an error: stop sending
            return
        if not fast:
            delay = start + index * FRAME_SECONDS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        try:
            await client.send_pcm(frame)
        except ServerError as exc:  # the server closed: the receiver reports why (or this does)
            conversation.error = conversation.error or str(exc)
            return
        conversation.frames_sent += 1
        if fast:
            await asyncio.sleep(0)  # let the receiver run between frames


async def _collect(client: DuplexClient, conversation: Conversation, on_text) -> None:
    """Record every event until the connection closes or the server reports an error."""
    async for event in client:
        conversation.last_event = time.monotonic()
        if isinstance(event, AudioEvent):
            conversation.audio.append(event.pcm)
        elif isinstance(event, TextEvent):
            conversation.pieces.append(event.text)
            if on_text is not None:
                on_text(event.text)
        elif isinstance(event, MetadataEvent):
            conversation.metadata.append(event.data)
        elif isinstance(event, ErrorEvent):
            conversation.error = event.message
            return


async def _wait_until_quiet(conversation: Conversation, receiver: asyncio.Future, quiet: float) -> None:
    """Wait until nothing arrived for ``quiet`` seconds (or the connection ended)."""
    conversation.last_event = max(conversation.last_event, time.monotonic())
    while not receiver.done():
        remaining = conversation.last_event + quiet - time.monotonic()
        if remaining <= 0:
            return
        await asyncio.wait({receiver}, timeout=remaining)
