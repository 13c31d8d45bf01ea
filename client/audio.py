"""Audio files for the clients: WAV in and out, mono 24 kHz conversion, 80 ms framing.

Everything here works on ``np.float32`` PCM in [-1, 1]. Reading accepts any sample rate and channel
count that libsndfile understands (WAV, FLAC, OGG, ...); it mixes down to mono and resamples to
24 kHz with a windowed-sinc polyphase filter (exact output length, no added delay).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from duplex.server import protocol

SAMPLE_RATE = protocol.SAMPLE_RATE
FRAME_SIZE = protocol.FRAME_SIZE  # 80 ms at 24 kHz: one model step
ZERO_CROSSINGS = 16  # filter half-width, in periods of the lower of the two rates
KAISER_BETA = 8.6
CUTOFF = 0.95  # fraction of the lower Nyquist frequency kept
OUTPUT_BLOCK = 1 << 15  # output samples computed at once (bounds the memory of the gather)


class AudioFileError(ValueError):
    """An audio file could not be read or written; the message is meant for the user."""


def read_audio_channels(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 ``[C, T]`` at its own rate, with one clear error for bad files."""
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"audio file not found: {path}")
    try:
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [T, C]
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioFileError(f"{path} is not a readable audio file: {exc}") from exc
    if data.shape[0] == 0:
        raise AudioFileError(f"{path} holds no audio samples")
    if not np.isfinite(data).all():
        raise AudioFileError(f"{path} holds NaN or infinite samples")
    return data.T, file_rate


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as mono float32 PCM at ``sample_rate``: shape ``[T]``."""
    data, file_rate = read_audio_channels(path)  # [C, T]
    return resample(to_mono(data), file_rate, sample_rate)


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write float32 PCM (``[T]`` mono or ``[C, T]``) as a 16-bit WAV file."""
    import soundfile

    pcm = np.asarray(pcm, dtype=np.float32)
    frames = pcm if pcm.ndim == 1 else pcm.T  # soundfile wants [T] or [T, C]
    try:
        soundfile.write(str(path), np.clip(frames, -1.0, 1.0), sample_rate, subtype="PCM_16")
    except (soundfile.LibsndfileError, RuntimeError, OSError) as exc:
        raise AudioFileError(f"cannot write {path}: {exc}") from exc


def to_mono(audio: np.ndarray) -> np.ndarray:
    """``[C, T]`` (or ``[T]``) -> ``[T]`` by averaging the channels."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        return audio
    if audio.ndim != 2:
        raise ValueError(f"expected audio of shape [C, T] or [T], got {audio.shape}")
    return audio.mean(axis=0, dtype=np.float32) if audio.shape[0] > 1 else audio[0]


def resample(pcm: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono ``[T]`` PCM; the output has ``ceil(T * to_rate / from_rate)`` samples."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim != 1:
        raise ValueError(f"resample expects mono audio [T], got shape {pcm.shape}")
    if from_rate == to_rate:
        return pcm.copy()
    g = math.gcd(from_rate, to_rate)
    up, down = to_rate // g, from_rate // g
    phases = polyphase_filters(up, down)  # [up, taps]
    return _apply_polyphase(pcm, phases, up, down)


def polyphase_filters(up: int, down: int) -> np.ndarray:
    """Kaiser-windowed sinc low-pass at the upsampled rate, split into ``up`` phases ``[up, taps]``."""
    wider = max(up, down)
    half = ZERO_CROSSINGS * wider
    t = np.arange(-half, half + 1, dtype=np.float64)  # [2*half + 1]
    cutoff = CUTOFF / wider  # in cycles per upsampled sample, times 2 (sinc's convention)
    taps = cutoff * np.sinc(cutoff * t) * np.kaiser(t.size, KAISER_BETA) * up
    per_phase = -(-t.size // up)
    padded = np.zeros(per_phase * up)
    padded[: t.size] = taps
    # phase r holds taps r, r + up, r + 2*up, ... : [up, per_phase]
    return padded.reshape(per_phase, up).T.astype(np.float32)


def _apply_polyphase(pcm: np.ndarray, phases: np.ndarray, up: int, down: int) -> np.ndarray:
    """y[n] = sum_j phases[r_n, j] * x[q_n - j], with (q_n, r_n) = divmod(n*down + half, up)."""
    n_taps = phases.shape[1]
    half = ZERO_CROSSINGS * max(up, down)  # centre tap of the filter, as in polyphase_filters
    n_out = -(-pcm.size * up // down)
    padded = np.concatenate([np.zeros(n_taps, np.float32), pcm, np.zeros(n_taps + 1, np.float32)])
    out = np.empty(n_out, dtype=np.float32)
    offsets = np.arange(n_taps)  # [J]
    for start in range(0, n_out, OUTPUT_BLOCK):
        n = np.arange(start, min(start + OUTPUT_BLOCK, n_out), dtype=np.int64)  # [N]
        q, r = np.divmod(n * down + half, up)  # [N], [N]
        window = padded[(q + n_taps)[:, None] - offsets[None, :]]  # [N, J]
        out[start : start + n.size] = np.einsum("nj,nj->n", window, phases[r])
    return out


def frames(pcm: np.ndarray, frame_size: int = FRAME_SIZE) -> Iterator[np.ndarray]:
    """Split ``[T]`` PCM into ``[frame_size]`` frames, zero-padding the last one."""
    pcm = np.asarray(pcm, dtype=np.float32)
    for start in range(0, pcm.size, frame_size):
        frame = pcm[start : start + frame_size]
        if frame.size < frame_size:
            frame = np.concatenate([frame, np.zeros(frame_size - frame.size, np.float32)])
        yield frame


def frame_count(num_samples: int, frame_size: int = FRAME_SIZE) -> int:
    """How many frames :func:`frames` yields for ``num_samples`` samples."""
    return -(-num_samples // frame_size)
