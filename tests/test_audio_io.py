"""WAV reading/writing, mono mixdown, resampling to 24 kHz and 80 ms framing (duplex.client.audio)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from duplex.client.audio import (
    FRAME_SIZE,
    SAMPLE_RATE,
    AudioFileError,
    frame_count,
    frames,
    read_audio,
    resample,
    to_mono,
    write_wav,
)


def tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resample_keeps_a_tone_and_the_duration(rate):
    out = resample(tone(440.0, rate, 1.0), rate, SAMPLE_RATE)
    assert out.dtype == np.float32
    assert out.size == SAMPLE_RATE
    expected = tone(440.0, SAMPLE_RATE, 1.0)
    # away from the edges (the filter sees zeros beyond the ends) the tone is reproduced closely
    assert np.abs(out - expected)[500:-500].max() < 1e-3


def test_resample_removes_frequencies_above_the_new_nyquist():
    out = resample(tone(15000.0, 48000, 1.0), 48000, SAMPLE_RATE)  # 15 kHz > 12 kHz Nyquist
    assert np.sqrt(np.mean(out[500:-500] ** 2)) < 1e-3


def test_resample_identity_and_bad_arguments():
    x = tone(300.0, SAMPLE_RATE, 0.1)
    np.testing.assert_array_equal(resample(x, SAMPLE_RATE), x)
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 10), np.float32), 16000)


def test_stereo_44k_file_becomes_mono_24k(tmp_path):
    left, right = tone(440.0, 44100, 0.5), tone(440.0, 44100, 0.5) * 0.0
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    pcm = read_audio(path)
    assert pcm.shape == (12000,)
    # mean of the two channels: half the left tone
    np.testing.assert_allclose(pcm[500:-500], tone(440.0, SAMPLE_RATE, 0.5)[500:-500] * 0.5, atol=1e-3)


def test_to_mono_shapes():
    assert to_mono(np.ones(5, np.float32)).shape == (5,)
    np.testing.assert_array_equal(to_mono(np.array([[1.0, 1.0], [0.0, 2.0]])), [0.5, 1.5])
    with pytest.raises(ValueError):
        to_mono(np.zeros((1, 2, 3)))


def test_write_then_read_round_trip(tmp_path):
    pcm = tone(1000.0, SAMPLE_RATE, 0.3)
    write_wav(tmp_path / "x.wav", pcm)
    info = soundfile.info(tmp_path / "x.wav")
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
    np.testing.assert_allclose(read_audio(tmp_path / "x.wav"), pcm, atol=1e-4)


def test_framing_pads_the_last_frame():
    pcm = np.arange(2 * FRAME_SIZE + 5, dtype=np.float32)
    chunks = list(frames(pcm))
    assert len(chunks) == frame_count(pcm.size) == 3
    assert all(c.shape == (FRAME_SIZE,) for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks)[: pcm.size], pcm)
    assert not chunks[-1][5:].any()
    assert list(frames(np.zeros(0, np.float32))) == []


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(AudioFileError, match="not found"):
        read_audio(tmp_path / "missing.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioFileError, match="not a readable audio file"):
        read_audio(garbage)
    good = tmp_path / "good.wav"
    write_wav(good, tone(440.0, SAMPLE_RATE, 0.2))
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:30])  # cut inside the header
    with pytest.raises(AudioFileError, match="not a readable audio file"):
        read_audio(truncated)
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, np.float32))
    with pytest.raises(AudioFileError, match="no audio"):
        read_audio(empty)


def test_truncated_data_chunk_reads_what_is_there(tmp_path):
    good = tmp_path / "good.wav"
    write_wav(good, tone(440.0, SAMPLE_RATE, 0.2))
    cut = tmp_path / "cut.wav"
    data = good.read_bytes()
    cut.write_bytes(data[: 44 + 2 * 1000])  # header + 1000 16-bit samples
    assert read_audio(cut).shape == (1000,)
