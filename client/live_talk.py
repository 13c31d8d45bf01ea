"""Microphone and speaker conversation (``duplex talk`` without ``--input``), via sounddevice.

The microphone callback hands 80 ms blocks to the event loop, which sends them at once; the
speaker callback plays from a small jitter buffer fed by the server's audio (silence on underrun).
Text pieces are printed live. Ctrl-C ends the call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from duplex.client.audio import FRAME_SIZE, SAMPLE_RATE
from duplex.client.client import AudioEvent, DuplexClient, ErrorEvent, TextEvent

logger = logging.getLogger(__name__)

MAX_BUFFER_SECONDS = 2.0  # playback lag beyond which the oldest audio is dropped
MIC_QUEUE_FRAMES = 25  # 2 s of microphone audio waiting to be sent


class AudioDeviceError(RuntimeError):
    """No usable audio device (or no PortAudio); the message is meant for the user."""


class PlaybackBuffer:
    """Thread-safe FIFO of samples between the network (writer) and the speaker callback (reader)."""

    def __init__(self, max_samples: int = int(MAX_BUFFER_SECONDS * SAMPLE_RATE)) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self._size = 0
        self._lock = threading.Lock()
        self.max_samples = max_samples
        self.underruns = 0

    def write(self, pcm: np.ndarray) -> None:
        with self._lock:
            self._chunks.append(np.asarray(pcm, dtype=np.float32))
            self._size += pcm.size
            while self._size > self.max_samples and len(self._chunks) > 1:
                self._size -= self._chunks.popleft().size

    def read_into(self, out: np.ndarray) -> None:
        """Fill ``out`` ([N] float32) with the oldest samples, zeros where there are none."""
        filled = 0
        with self._lock:
            while filled < out.size and self._chunks:
                chunk = self._chunks[0]
                take = min(chunk.size, out.size - filled)
                out[filled : filled + take] = chunk[:take]
                filled += take
                self._size -= take
                if take == chunk.size:
                    self._chunks.popleft()
                else:
                    self._chunks[0] = chunk[take:]
        if filled < out.size:
            out[filled:] = 0.0
            if filled or self._size:
                self.underruns += 1


def import_sounddevice():
    """sounddevice, or a clear error when PortAudio is missing."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise AudioDeviceError(
            f"audio devices are unavailable ({exc}); install PortAudio (e.g. apt-get install libportaudio2) "
            "or talk with files: --input in.wav --output out.wav"
        ) from exc
    return sounddevice


def check_devices(input_device=None, output_device=None) -> None:
    """Fail early (before connecting) when the microphone or speaker cannot do 24 kHz mono float32."""
    sd = import_sounddevice()
    checks = ((sd.check_input_settings, input_device, "microphone"),
              (sd.check_output_settings, output_device, "speaker"))
    for check, device, role in checks:
        try:
            check(device=device, channels=1, dtype="float32", samplerate=SAMPLE_RATE)
        except (sd.PortAudioError, ValueError) as exc:
            raise AudioDeviceError(
                f"no usable {role} ({device or 'default device'}: {exc}); list devices with "
                "`python -m sounddevice`, pick one with --input-device/--output-device, or talk with files: "
                "--input in.wav --output out.wav"
            ) from exc


async def talk_live(client: DuplexClient, on_text: Callable[[str], None], input_device=None,
                    output_device=None) -> str | None:
    """Run a call until the server ends it (returns its error, if any) or Ctrl-C."""
    sd = import_sounddevice()
    loop = asyncio.get_running_loop()
    mic: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=MIC_QUEUE_FRAMES)
    speaker = PlaybackBuffer()

    def on_mic(indata, frame_count, time_info, status) -> None:
        loop.call_soon_threadsafe(_offer, mic, indata[:, 0].copy())

    def on_speaker(outdata, frame_count, time_info, status) -> None:
        speaker.read_into(outdata[:, 0])

    mic_stream = _open_stream(sd, sd.InputStream, input_device, on_mic)
    try:
        speaker_stream = _open_stream(sd, sd.OutputStream, output_device, on_speaker)
    except AudioDeviceError:
        mic_stream.close()
        raise
    sender = asyncio.ensure_future(_send_microphone(client, mic))
    try:
        with mic_stream, speaker_stream:
            return await _play_events(client, speaker, on_text)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        if speaker.underruns:
            logger.info("playback underruns: %d", speaker.underruns)


def _open_stream(sd, stream_class, device, callback):
    """An opened (not yet started) 24 kHz mono float32 stream with 80 ms blocks."""
    try:
        return stream_class(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=FRAME_SIZE,
                            device=device, callback=callback)
    except (sd.PortAudioError, ValueError) as exc:
        raise AudioDeviceError(f"cannot open the audio device {device or '(default)'} at {SAMPLE_RATE} Hz: "
                               f"{exc}") from exc


def _offer(queue: asyncio.Queue, frame: np.ndarray) -> None:
    """Queue a microphone block, dropping the oldest when the network falls behind."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(frame)


async def _send_microphone(client: DuplexClient, mic: asyncio.Queue) -> None:
    while True:
        await client.send_pcm(await mic.get())


async def _play_events(client: DuplexClient, speaker: PlaybackBuffer, on_text) -> str | None:
    async for event in client:
        if isinstance(event, AudioEvent):
            speaker.write(event.pcm)
        elif isinstance(event, TextEvent):
            on_text(event.text)
        elif isinstance(event, ErrorEvent):
            return event.message
    return None
